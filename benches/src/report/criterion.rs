//! Reading criterion's data back: every `<home>/**/new/{benchmark,sample}.json` as one
//! [`CriterionBench`] (its id and each sample's time per iteration).

use std::path::Path;

use serde::Deserialize;

use crate::{error::Result, results};

/// One criterion benchmark as its last run left it.
#[derive(Debug, Clone)]
pub struct CriterionBench {
    /// `group/function/value`.
    pub id: String,
    /// Bytes per iteration, when the bench declared a byte throughput.
    pub bytes_per_iter: Option<u64>,
    /// Each sample's time per iteration, in nanoseconds.
    pub per_iter_ns: Vec<f64>,
}

#[derive(Deserialize)]
struct BenchmarkJson {
    group_id: String,
    function_id: Option<String>,
    value_str: Option<String>,
    throughput: Option<ThroughputJson>,
}

#[derive(Deserialize)]
enum ThroughputJson {
    Bytes(u64),
    BytesDecimal(u64),
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct SampleJson {
    iters: Vec<f64>,
    times: Vec<f64>,
}

/// Every benchmark under criterion's `home` (none if it does not exist).
pub fn load_criterion(home: &Path) -> Result<Vec<CriterionBench>> {
    let mut found = Vec::new();
    let mut dirs = vec![home.to_path_buf()];
    // Criterion's tree is a few levels deep; the walk is bounded by what exists.
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            if path.file_name().is_some_and(|n| n == "new") {
                if path.join("benchmark.json").is_file() && path.join("sample.json").is_file() {
                    found.push(load_one(&path)?);
                }
            } else if path
                .file_name()
                .is_none_or(|n| n != "report" && n != "base")
            {
                dirs.push(path);
            }
        }
    }
    found.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(found)
}

fn load_one(new_dir: &Path) -> Result<CriterionBench> {
    let meta: BenchmarkJson = results::read_json(&new_dir.join("benchmark.json"))?;
    let sample: SampleJson = results::read_json(&new_dir.join("sample.json"))?;
    let id = [Some(meta.group_id), meta.function_id, meta.value_str]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("/");
    let bytes_per_iter = match meta.throughput {
        Some(ThroughputJson::Bytes(n) | ThroughputJson::BytesDecimal(n)) => Some(n),
        _ => None,
    };
    let per_iter_ns = sample
        .times
        .iter()
        .zip(&sample.iters)
        .filter(|(_, iters)| **iters > 0.0)
        .map(|(t, iters)| t / iters)
        .collect();
    Ok(CriterionBench {
        id,
        bytes_per_iter,
        per_iter_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_criterion_directories() {
        let home =
            std::env::temp_dir().join(format!("criterion-report-test-{}", std::process::id()));
        let new = home.join("echo_throughput/echo-server/16B-1conn/new");
        std::fs::create_dir_all(&new).unwrap();
        std::fs::create_dir_all(home.join("report")).unwrap();
        std::fs::write(
            new.join("benchmark.json"),
            r#"{"group_id":"echo/throughput","function_id":"echo-server","value_str":"16B-1conn","throughput":{"Bytes":16},"full_id":"x","directory_name":"x","title":"x"}"#,
        )
        .unwrap();
        std::fs::write(
            new.join("sample.json"),
            r#"{"sampling_mode":"Linear","iters":[1.0,2.0],"times":[10.0,30.0]}"#,
        )
        .unwrap();
        let found = load_criterion(&home).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, "echo/throughput/echo-server/16B-1conn");
        assert_eq!(found[0].bytes_per_iter, Some(16));
        assert_eq!(found[0].per_iter_ns, vec![10.0, 15.0]);
        std::fs::remove_dir_all(&home).unwrap();
        assert!(load_criterion(&home).unwrap().is_empty());
    }
}
