//! cohort-crypto
