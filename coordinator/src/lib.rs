//! Coordinator
