"""Offline unlearning: weight edits (SSD, FLAT) that produce a new checkpoint, and the metrics that
show what an edit did (membership inference, greedy answers for ROUGE scoring).

Nothing here knows about the gateway's store or HTTP surface; callers hand in texts and a model.
"""
