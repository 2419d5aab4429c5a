//! NCCL backend (written below).
