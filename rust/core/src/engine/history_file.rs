//! Past-Future's length history on disk, so that a restarted server starts from what it learned
//! instead of from its prior. A small JSON file, written whole to a temporary name and renamed
//! over the old one, so a crash mid-write leaves the previous version.
//!
//! A file that is missing, unreadable, corrupt or written for another model is never an error:
//! the engine starts cold and says why (a served engine must not fail to start over a cache).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{HoraeError, Result};

/// The `format` field: names what the file is, and its version.
const FORMAT: &str = "horae-length-history/1";

/// Save after this many new lengths (and when the engine stops), so a crash loses little.
pub const SAVE_EVERY: u64 = 64;

#[derive(Debug, Serialize, Deserialize)]
struct OnDisk {
    format: String,
    /// Which model's outputs these are (`HistoryFile::model`).
    model: String,
    /// Output lengths, oldest first.
    lengths: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HistoryFile {
    pub path: PathBuf,
    /// Identifies the model the lengths were measured on; another model's file is not loaded.
    pub model: String,
}

/// What loading found: the lengths to start from, and a sentence for the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub lengths: Vec<u32>,
    /// Whether the file was there and used; `false` means the engine starts cold.
    pub warm: bool,
    pub message: String,
}

impl HistoryFile {
    pub fn new(path: impl Into<PathBuf>, model: impl Into<String>) -> Self {
        Self { path: path.into(), model: model.into() }
    }

    pub fn load(&self) -> Loaded {
        let cold = |why: String| Loaded {
            lengths: Vec::new(),
            warm: false,
            message: format!("{why}: Past-Future starts cold from its prior"),
        };
        let p = self.path.display();
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return cold(format!("no length history at {p} yet (it is written as requests finish)"))
            }
            Err(e) => return cold(format!("cannot read the length history {p} ({e})")),
        };
        let file: OnDisk = match serde_json::from_str(&text) {
            Ok(f) => f,
            Err(e) => return cold(format!("the length history {p} is not a horae history file ({e})")),
        };
        if file.format != FORMAT {
            return cold(format!("the length history {p} has format '{}', expected '{FORMAT}'", file.format));
        }
        if file.model != self.model {
            return cold(format!("the length history {p} is for model '{}', not '{}'", file.model, self.model));
        }
        if file.lengths.contains(&0) {
            return cold(format!("the length history {p} holds a zero length"));
        }
        let message = format!("loaded {} output lengths from {p}", file.lengths.len());
        Loaded { lengths: file.lengths, warm: true, message }
    }

    pub fn save(&self, lengths: &[u32]) -> Result<()> {
        let io = |e: std::io::Error| HoraeError::Io(format!("writing the length history {}: {e}", self.path.display()));
        let body = OnDisk { format: FORMAT.into(), model: self.model.clone(), lengths: lengths.to_vec() };
        let text = serde_json::to_string(&body).expect("plain data serializes");
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = tmp_path(&self.path);
        fs::write(&tmp, text).map_err(io)?;
        fs::rename(&tmp, &self.path).map_err(io)
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "horae-history-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_every_bad_file_starts_cold() {
        let d = dir();
        let f = HistoryFile::new(d.join("sub/h.json"), "smollm2");
        let missing = f.load();
        assert!(!missing.warm && missing.lengths.is_empty() && missing.message.contains("no length history"));

        f.save(&[5, 7, 3]).unwrap();
        let got = f.load();
        assert!(got.warm, "{}", got.message);
        assert_eq!(got.lengths, vec![5, 7, 3]);

        let other = HistoryFile::new(f.path.clone(), "llama-2-7b").load();
        assert!(!other.warm && other.message.contains("is for model 'smollm2'"), "{}", other.message);

        for (bad, says) in [
            ("{not json", "not a horae history file"),
            ("{\"format\":\"x/9\",\"model\":\"smollm2\",\"lengths\":[1]}", "has format 'x/9'"),
            ("{\"format\":\"horae-length-history/1\",\"model\":\"smollm2\",\"lengths\":[1,-4]}", "not a horae"),
            ("{\"format\":\"horae-length-history/1\",\"model\":\"smollm2\",\"lengths\":[1,0]}", "zero length"),
        ] {
            fs::write(&f.path, bad).unwrap();
            let l = f.load();
            assert!(!l.warm && l.lengths.is_empty(), "{bad}");
            assert!(l.message.contains(says) && l.message.contains("starts cold"), "{bad}: {}", l.message);
        }
        fs::remove_dir_all(d).unwrap();
    }
}
