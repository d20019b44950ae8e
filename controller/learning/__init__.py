"""Learning: label-store arrays and splits, the training job's config, Lightning training of the
net, baseline policies, the adapted head, evaluation, timing tables and the training report.

Imports `controller.runtime` (the net and the policies it trains) and `controller.guarantee`;
never `controller.experiments`.
"""
