"""Flow-matching math: path, schedule, solver, query-state sampler, losses, guidance."""

from danceopd.flow.guidance import cfg_combine
from danceopd.flow.loss import dense_state_weights, dense_velocity_loss, per_state_mse, velocity_mse
from danceopd.flow.path import clean_estimate, forward_noise, velocity_target
from danceopd.flow.query import gather_states, sample_query_indices
from danceopd.flow.schedule import SigmaGrids, grid_for, sd3_sigmas, sigma_schedule, uniform_sigmas
from danceopd.flow.solver import QueriedStates, Trajectory, euler_step, rollout_states, rollout_to_queries

__all__ = [
    "QueriedStates", "SigmaGrids", "Trajectory", "cfg_combine", "clean_estimate", "dense_state_weights", "dense_velocity_loss", "euler_step", "forward_noise",
    "gather_states", "grid_for", "rollout_states", "rollout_to_queries", "sample_query_indices", "sd3_sigmas", "sigma_schedule",
    "uniform_sigmas", "per_state_mse", "velocity_mse", "velocity_target",
]
