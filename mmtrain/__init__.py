"""mmtrain: distributed multimodal pretraining (CausalFusion, TransDiff)."""
__version__ = "0.1.0"
