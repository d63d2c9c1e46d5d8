//! NCCL engine (feature `cuda`).
