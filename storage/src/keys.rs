//! Keys for encrypting model versions at rest: a key directory (`cohort keys`) here, a
//! PKCS#11 token in [`crate::pkcs11`].

use std::path::Path;

use cohort_crypto::atrest::KeyFileProvider;

use crate::error::{StoreError, io, write_atomic};

/// Keys for encryption at rest from a key directory: `<id>.kek` files (64 hex digits, mode
/// 0600) and a `current` file naming the one that wraps new data keys. `cohort keys` writes
/// and rotates them.
pub fn load_key_dir(dir: &Path) -> Result<KeyFileProvider, StoreError> {
    let bad = |message: String| StoreError::Keys {
        path: dir.to_path_buf(),
        message,
    };
    let current_path = dir.join("current");
    let current = std::fs::read_to_string(&current_path).map_err(io(&current_path))?;
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".kek"))
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let bytes = hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| bad(format!("{}: not 64 hex digits", path.display())))?;
        keys.push((id.to_string(), bytes));
    }
    KeyFileProvider::from_keys(keys, current.trim()).map_err(|e| bad(e.to_string()))
}

/// Adds a new key to `dir` (creating it) and makes it current. Returns its id.
pub fn add_key(dir: &Path) -> Result<String, StoreError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let n = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".kek"))
        })
        .count();
    let id = format!("kek-{}", n + 1);
    let key = KeyFileProvider::new_key().map_err(|e| StoreError::Keys {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let path = dir.join(format!("{id}.kek"));
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    use std::io::Write;
    o.open(&path)
        .and_then(|mut f| {
            f.write_all(hex::encode(key).as_bytes())
                .and_then(|_| f.sync_all())
        })
        .map_err(io(&path))?;
    write_atomic(&dir.join("current"), id.as_bytes())?;
    Ok(id)
}
