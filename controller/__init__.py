"""Controller: predictor, training, calibration, policies, export and the inference hook.

Built in the controller issue; sits on `data` and `sparse_kernels`.
"""
