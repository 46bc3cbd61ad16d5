//! Loading and attaching the kernel programs, and reading their maps.
// (being written)
