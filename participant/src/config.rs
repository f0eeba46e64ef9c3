//! `participant.toml`: where the coordinator is, who this participant is, and its data.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_model::{ComputeDevice, IdxSplit, LabelColumn};
use serde::Deserialize;

use crate::{AgentOptions, LocalData};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParticipantConfig {
    /// e.g. `"http://coordinator.example.org:7400"`.
    pub coordinator: String,
    /// This participant's identity.
    pub id: String,
    #[serde(default)]
    pub device: ComputeDevice,
    #[serde(default = "default_poll_wait")]
    pub poll_wait_ms: u64,
    /// Give up after the coordinator has been unreachable this long.
    #[serde(default = "default_reconnect")]
    pub reconnect_for_secs: u64,
    /// "participant" (trains on `[data]`) or "custodian" (a dedicated key custodian of the
    /// secure-aggregation committee: holds no data, only answers decryption requests).
    #[serde(default)]
    pub role: Role,
    /// Required for participants; custodians have none.
    #[serde(default)]
    pub data: Option<DataConfig>,
    /// Mutual TLS (`cohort provision` writes this section). Without it the node only runs
    /// with `--insecure-dev`.
    #[serde(default)]
    pub tls: Option<cohort_protocol::tls::TlsFiles>,
    /// Fault injection, for experiments and tests.
    #[serde(default)]
    pub faults: FaultConfig,
    /// When a job finishes, wait for the coordinator's next job instead of exiting.
    #[serde(default)]
    pub stay_between_jobs: bool,
    /// Train only for tasks with distributed differential-privacy noise of at least this
    /// noise multiplier (computed from the task's noise, clip norm and the round's T_min).
    #[serde(default)]
    pub min_noise_multiplier: Option<f64>,
    /// Where this node keeps what it must remember between rounds (SCAFFOLD's control
    /// variates); relative to this file. Without it they are kept in memory only.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

/// `[faults]`: deliberate misbehaviour, off by default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// Wait this long after training before each upload.
    #[serde(default)]
    pub upload_delay_ms: u64,
    /// As a committee member, wait this long after each decryption request before answering.
    #[serde(default)]
    pub answer_delay_ms: u64,
}

fn default_poll_wait() -> u64 {
    10_000
}
fn default_reconnect() -> u64 {
    300
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Participant,
    Custodian,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// A numeric CSV table, standardised with this site's own statistics.
    Csv,
    /// IDX images (Fashion-MNIST's format).
    Idx,
    /// A CSV table of a job that declares its tables (`[job.data]`): read against the
    /// job's schema when the coordinator sends it (missing values and categories allowed),
    /// prepared by the federation's pipeline.
    Table,
}

/// `[data]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub format: DataFormat,
    /// A CSV file, or an MNIST-style IDX directory (its training half is used).
    pub path: PathBuf,
    /// CSV label column: a name, a zero-based index, or "last".
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    /// Standardise features with statistics of this participant's own training data.
    /// Defaults to true for CSV, false for images.
    #[serde(default)]
    pub standardize: Option<bool>,
    #[serde(default)]
    pub seed: u64,
}

fn default_test_fraction() -> f64 {
    0.2
}

impl ParticipantConfig {
    /// Reads `path`; relative data paths are taken from the config file's directory.
    /// Errors begin with the path.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks a configuration; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        let mut cfg: ParticipantConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(data) = cfg.data.as_mut()
            && data.path.is_relative()
        {
            data.path = base.join(&data.path);
        }
        if let Some(dir) = cfg.state_dir.as_mut()
            && dir.is_relative()
        {
            *dir = base.join(&*dir);
        }
        if cfg.id.is_empty() {
            return Err("id must not be empty".into());
        }
        cfg.tls = cfg.tls.map(|t| t.relative_to(base));
        match (cfg.role, cfg.data.is_some()) {
            (Role::Participant, false) => {
                return Err(
                    "a participant needs a [data] section (or role = \"custodian\")".into(),
                );
            }
            (Role::Custodian, true) => {
                return Err("a custodian holds no data: remove the [data] section".into());
            }
            _ => {}
        }
        Ok(cfg)
    }

    pub fn options(&self) -> AgentOptions {
        AgentOptions {
            id: self.id.clone(),
            coordinator: self.coordinator.clone(),
            device: self.device,
            poll_wait: Duration::from_millis(self.poll_wait_ms),
            reconnect_for: Duration::from_secs(self.reconnect_for_secs),
            faults: crate::Faults {
                upload_delay: Duration::from_millis(self.faults.upload_delay_ms),
                answer_delay: Duration::from_millis(self.faults.answer_delay_ms),
            },
            tls: None,
            stay_between_jobs: self.stay_between_jobs,
            compute: None,
            min_noise_multiplier: self.min_noise_multiplier,
            state_dir: self.state_dir.clone(),
        }
    }

    /// Loads, splits and standardises the data (participants only).
    pub fn load_data(&self) -> Result<crate::SiteData, String> {
        let d = self
            .data
            .as_ref()
            .ok_or_else(|| "this node has no [data] section".to_string())?;
        if d.format == DataFormat::Table {
            let text = std::fs::read_to_string(&d.path)
                .map_err(|e| format!("{}: {e}", d.path.display()))?;
            return Ok(crate::SiteData::Csv(std::sync::Arc::new(crate::SiteCsv {
                text,
                path: d.path.clone(),
                test_fraction: d.test_fraction,
                seed: d.seed,
            })));
        }
        let ds = match d.format {
            DataFormat::Csv => {
                let label: LabelColumn = d
                    .label
                    .as_deref()
                    .unwrap_or("last")
                    .parse()
                    .expect("infallible");
                cohort_model::data::load_csv(&d.path, &label)
            }
            DataFormat::Idx => cohort_model::data::load_idx_dir(&d.path, IdxSplit::Train),
            DataFormat::Table => unreachable!("returned above"),
        }
        .map_err(|e| e.to_string())?;
        let standardize = d.standardize.unwrap_or(d.format == DataFormat::Csv);
        LocalData::prepare(ds, d.test_fraction, standardize, d.seed)
            .map(|l| crate::SiteData::Ready(std::sync::Arc::new(l)))
            .map_err(|e| format!("{}: {e}", d.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<ParticipantConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, text).unwrap();
        ParticipantConfig::load(&path)
    }

    const HEAD: &str = "coordinator = \"http://127.0.0.1:7400\"\nid = \"x\"\n";
    const DATA: &str = "[data]\nformat = \"csv\"\npath = \"d.csv\"\n";

    #[test]
    fn roles_and_data_sections_must_agree() {
        let p = load(&format!("{HEAD}{DATA}")).unwrap();
        assert_eq!(p.role, Role::Participant);
        assert!(
            p.data.unwrap().path.is_absolute(),
            "relative to the config file"
        );
        let c = load(&format!("role = \"custodian\"\n{HEAD}")).unwrap();
        assert_eq!(c.role, Role::Custodian);
        let e = load(HEAD).unwrap_err();
        assert!(e.contains("[data]"), "{e}");
        let e = load(&format!("role = \"custodian\"\n{HEAD}{DATA}")).unwrap_err();
        assert!(e.contains("custodian"), "{e}");
        let e = load(&format!("role = \"auditor\"\n{HEAD}")).unwrap_err();
        assert!(e.contains("auditor"), "{e}");
    }
}
