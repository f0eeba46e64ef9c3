//! SCAFFOLD's control variates this node keeps from round to round, one per job: in memory,
//! and in `state_dir` when the node has one, so that a restarted node goes on from its own
//! rather than from zeros.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub(crate) struct Controls {
    dir: Option<PathBuf>,
    held: BTreeMap<String, Vec<f32>>,
}

impl Controls {
    pub(crate) fn new(dir: Option<PathBuf>) -> Self {
        Controls {
            dir,
            held: BTreeMap::new(),
        }
    }

    fn path(dir: &Path, job: &str) -> PathBuf {
        let hex: String = job.bytes().map(|b| format!("{b:02x}")).collect();
        dir.join(format!("control-variate-{hex}.f32"))
    }

    /// This node's control variate for `job` (`None` before its first SCAFFOLD round: zeros).
    /// A stored one of another length than the model's is an error naming the file.
    pub(crate) fn get(&mut self, job: &str, len: usize) -> Result<Option<Vec<f32>>, String> {
        if let Some(c) = self.held.get(job) {
            return Ok(Some(c.clone()));
        }
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let path = Self::path(dir, job);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        if bytes.len() != 4 * len {
            return Err(format!(
                "{}: {} bytes, not the {len} little-endian f32 values of job {job}'s model",
                path.display(),
                bytes.len()
            ));
        }
        let c: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        self.held.insert(job.to_string(), c.clone());
        Ok(Some(c))
    }

    /// Keeps `control` as `job`'s, on disk first (written whole, then renamed into place).
    pub(crate) fn set(&mut self, job: &str, control: Vec<f32>) -> Result<(), String> {
        if let Some(dir) = &self.dir {
            let path = Self::path(dir, job);
            let tmp = path.with_extension("f32.tmp");
            let bytes: Vec<u8> = control.iter().flat_map(|x| x.to_le_bytes()).collect();
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&tmp, bytes))
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        self.held.insert(job.to_string(), control);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_control_variate_survives_a_restart_and_a_wrong_length_is_named() {
        let dir = std::env::temp_dir().join(format!("cohort-controls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut a = Controls::new(Some(dir.clone()));
        assert_eq!(a.get("job/1", 3).unwrap(), None);
        a.set("job/1", vec![1.0, -2.0, 0.5]).unwrap();
        let mut b = Controls::new(Some(dir.clone()));
        assert_eq!(b.get("job/1", 3).unwrap(), Some(vec![1.0, -2.0, 0.5]));
        let e = Controls::new(Some(dir.clone()))
            .get("job/1", 4)
            .unwrap_err();
        assert!(e.contains("12 bytes") && e.contains("job/1"), "{e}");
        let mut memory = Controls::new(None);
        memory.set("j", vec![2.0]).unwrap();
        assert_eq!(memory.get("j", 1).unwrap(), Some(vec![2.0]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
