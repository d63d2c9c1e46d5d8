//! Proto
