"""Ready-made reward functions for RLHF trainers (TRL, verl) that call a pal-rm server through service.client.

Only httpx is needed on the trainer side: nothing here imports torch, onnxruntime or FastAPI.
"""

from service.adapters.trl import make_trl_reward_func
from service.adapters.verl import compute_score, compute_score_batch, make_compute_score

__all__ = ["compute_score", "compute_score_batch", "make_compute_score", "make_trl_reward_func"]
