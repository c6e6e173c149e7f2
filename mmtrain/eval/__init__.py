"""Evaluation metrics computed by the reference implementations (pycocoevalcap, ...)."""
