"""The guarantee: Learn-then-Test calibration, the shift guard and the stream monitor, the live
risk bounds and threshold ladder, and recalibration (labeled, label-free, reweighed).

Its statistics (`arrays`, `calibrate`, `guard`, `monitor`, `risk`) are what the runtime applies and
import nothing from `controller.learning`; the recalibration workflows (`recalibrate`, `reweigh`,
`weighted`) use the learning pipeline. Nothing here imports `controller.experiments`.
"""
