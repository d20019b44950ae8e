"""Data: frozen models, tasks, features, labeling and the label store.

Sits on `sparse_kernels`; must not import `controller` or the command lines.
"""
