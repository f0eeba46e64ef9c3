//! The `cohort` command line's library half: the in-process simulation and the plots, so
//! benchmarks and tests drive exactly what `cohort simulate` runs.

pub mod admin_cli;
pub mod export_cli;
pub mod plot;
pub mod predict_cli;
pub mod provision;
pub mod schema_cli;
pub mod simulate;
