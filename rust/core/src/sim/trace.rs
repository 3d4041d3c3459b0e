//! Request traces: arrival times and prompt/output lengths, from the public formats.
//!
//! | format    | columns                                                   | arrivals            |
//! |-----------|-----------------------------------------------------------|---------------------|
//! | azure     | `TIMESTAMP,ContextTokens,GeneratedTokens`                 | from timestamps     |
//! | mooncake  | JSONL `{timestamp (ms), input_length, output_length, hash_ids}` | timestamps, equal ones spread |
//! | burstgpt  | `Timestamp,Model,Request tokens,Response tokens,...`      | from timestamps     |
//! | sharegpt  | `num_prefill_tokens,num_decode_tokens,...`                | none: assign a rate |
//! | castillo  | `...,input_size,output_sizes(';'-separated),...`          | none: assign a rate |

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde::Deserialize;

use crate::error::{HoraeError, Result};
use crate::names::named_enum;

#[derive(Debug, Clone, PartialEq)]
pub struct TraceRequest {
    /// Seconds from the start of the trace.
    pub arrival: f64,
    pub prompt_len: u32,
    /// The true output length: the simulator's executor ends the request there, and only the
    /// oracle scheduler may read it.
    pub output_len: u32,
    /// Ids of shared prompt-prefix units (Mooncake's `hash_ids`), if the trace has them.
    pub prefix_ids: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub name: String,
    pub requests: Vec<TraceRequest>,
    /// Whether arrivals are meaningful (false for length-only sets until arrivals are assigned).
    pub timed: bool,
    /// Tokens per prefix id.
    pub prefix_unit: usize,
}

named_enum! {
    /// A trace file's format (detected from its first line, or named).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum TraceFormat("trace format") {
        Azure = "azure",
        Mooncake = "mooncake",
        BurstGpt = "burstgpt",
        ShareGpt = "sharegpt",
        Castillo = "castillo",
        /// A JSON list of OpenAI usage records, `{"prompt_tokens", "completion_tokens", ...}`:
        /// the Past-Future paper's ShareGPT-o1.json. Lengths only.
        UsageJson = "usage-json" | "sharegpt-o1",
    }
}

fn err(path: &Path, line: Option<usize>, reason: impl Into<String>) -> HoraeError {
    HoraeError::Trace { path: path.display().to_string(), line, reason: reason.into() }
}

/// Guess the format from the first line.
pub fn detect_format(path: &Path) -> Result<TraceFormat> {
    let file = File::open(path).map_err(|e| err(path, None, e.to_string()))?;
    let mut first = String::new();
    BufReader::new(file).take(64 * 1024).read_line(&mut first).map_err(|e| err(path, Some(1), e.to_string()))?;
    let head = first.trim_start_matches('\u{feff}').trim();
    let format = if head.starts_with('[') {
        TraceFormat::UsageJson
    } else if head.starts_with('{') {
        TraceFormat::Mooncake
    } else if head.starts_with("TIMESTAMP,ContextTokens,GeneratedTokens") {
        TraceFormat::Azure
    } else if head.contains("Request tokens") && head.contains("Response tokens") {
        TraceFormat::BurstGpt
    } else if head.starts_with("num_prefill_tokens,num_decode_tokens") {
        TraceFormat::ShareGpt
    } else if head.contains("input_size") && head.contains("output_sizes") {
        TraceFormat::Castillo
    } else if head.is_empty() {
        return Err(err(path, Some(1), "the file is empty"));
    } else {
        return Err(err(
            path,
            Some(1),
            format!("unrecognised trace header '{}'", head.chars().take(80).collect::<String>()),
        ));
    };
    Ok(format)
}

pub fn load_trace(path: &Path, format: Option<TraceFormat>) -> Result<Trace> {
    let format = match format {
        Some(f) => f,
        None => detect_format(path)?,
    };
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let (requests, timed, prefix_unit) = match format {
        TraceFormat::Azure => (load_azure(path)?, true, 0),
        TraceFormat::Mooncake => (load_mooncake(path)?, true, 512),
        TraceFormat::BurstGpt => (load_burstgpt(path)?, true, 0),
        TraceFormat::ShareGpt => (load_sharegpt(path)?, false, 0),
        TraceFormat::Castillo => (load_castillo(path)?, false, 0),
        TraceFormat::UsageJson => (load_usage_json(path)?, false, 0),
    };
    if requests.is_empty() {
        return Err(err(path, None, "no requests in the trace"));
    }
    let mut trace = Trace { name, requests, timed, prefix_unit };
    if timed {
        let t0 = trace.requests.iter().map(|r| r.arrival).fold(f64::INFINITY, f64::min);
        for r in &mut trace.requests {
            r.arrival -= t0;
        }
        trace.requests.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    }
    Ok(trace)
}

fn csv_reader(path: &Path) -> Result<csv::Reader<File>> {
    csv::ReaderBuilder::new().trim(csv::Trim::All).from_path(path).map_err(|e| err(path, None, e.to_string()))
}

fn csv_err(path: &Path, e: csv::Error) -> HoraeError {
    let line = e.position().map(|p| p.line() as usize);
    let reason = match e.kind() {
        csv::ErrorKind::Deserialize { err, .. } => err.to_string(),
        _ => e.to_string(),
    };
    err(path, line, reason)
}

fn length(path: &Path, line: usize, what: &str, v: i64) -> Result<u32> {
    length_at(path, Some(line), what, v)
}

/// A positive token count that fits a `u32`; `line` where the file has lines.
fn length_at(path: &Path, line: Option<usize>, what: &str, v: i64) -> Result<u32> {
    if v <= 0 {
        return Err(err(path, line, format!("{what} must be positive, got {v}")));
    }
    u32::try_from(v).map_err(|_| err(path, line, format!("{what} {v} is too large")))
}

/// `YYYY-MM-DD HH:MM:SS[.fraction]` to seconds since 1970 (UTC, proleptic Gregorian).
fn parse_datetime(s: &str) -> Option<f64> {
    let (date, time) = s.trim().split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let sec = t.next()?.parse::<f64>().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || !(0.0..61.0).contains(&sec) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

fn load_azure(path: &Path) -> Result<Vec<TraceRequest>> {
    #[derive(Deserialize)]
    struct Row {
        #[serde(rename = "TIMESTAMP")]
        timestamp: String,
        #[serde(rename = "ContextTokens")]
        context: i64,
        #[serde(rename = "GeneratedTokens")]
        generated: i64,
    }
    let mut out = Vec::new();
    for (i, row) in csv_reader(path)?.deserialize::<Row>().enumerate() {
        let row = row.map_err(|e| csv_err(path, e))?;
        let line = i + 2;
        let arrival = parse_datetime(&row.timestamp)
            .ok_or_else(|| err(path, Some(line), format!("bad timestamp '{}'", row.timestamp)))?;
        out.push(TraceRequest {
            arrival,
            prompt_len: length(path, line, "ContextTokens", row.context)?,
            output_len: length(path, line, "GeneratedTokens", row.generated)?,
            prefix_ids: Vec::new(),
        });
    }
    Ok(out)
}

fn load_burstgpt(path: &Path) -> Result<Vec<TraceRequest>> {
    #[derive(Deserialize)]
    struct Row {
        #[serde(rename = "Timestamp")]
        timestamp: f64,
        #[serde(rename = "Request tokens")]
        request: i64,
        #[serde(rename = "Response tokens")]
        response: i64,
    }
    let mut out = Vec::new();
    for (i, row) in csv_reader(path)?.deserialize::<Row>().enumerate() {
        let row = row.map_err(|e| csv_err(path, e))?;
        let line = i + 2;
        // BurstGPT logs failed requests with zero response tokens; they never produced output.
        if row.response == 0 {
            continue;
        }
        if !row.timestamp.is_finite() || row.timestamp < 0.0 {
            return Err(err(path, Some(line), format!("bad timestamp {}", row.timestamp)));
        }
        out.push(TraceRequest {
            arrival: row.timestamp,
            prompt_len: length(path, line, "Request tokens", row.request)?,
            output_len: length(path, line, "Response tokens", row.response)?,
            prefix_ids: Vec::new(),
        });
    }
    Ok(out)
}

fn load_sharegpt(path: &Path) -> Result<Vec<TraceRequest>> {
    #[derive(Deserialize)]
    struct Row {
        num_prefill_tokens: i64,
        num_decode_tokens: i64,
    }
    let mut out = Vec::new();
    for (i, row) in csv_reader(path)?.deserialize::<Row>().enumerate() {
        let row = row.map_err(|e| csv_err(path, e))?;
        let line = i + 2;
        out.push(TraceRequest {
            arrival: 0.0,
            prompt_len: length(path, line, "num_prefill_tokens", row.num_prefill_tokens)?,
            output_len: length(path, line, "num_decode_tokens", row.num_decode_tokens)?,
            prefix_ids: Vec::new(),
        });
    }
    Ok(out)
}

/// A JSON list of usage records; other fields (`total_tokens`, `reasoning_tokens`) are ignored.
fn load_usage_json(path: &Path) -> Result<Vec<TraceRequest>> {
    #[derive(Deserialize)]
    struct Usage {
        prompt_tokens: i64,
        completion_tokens: i64,
    }
    let file = File::open(path).map_err(|e| err(path, None, e.to_string()))?;
    let rows: Vec<Usage> = serde_json::from_reader(BufReader::new(file))
        .map_err(|e| err(path, Some(e.line()), format!("not a JSON list of usage records: {e}")))?;
    rows.iter()
        .enumerate()
        .map(|(i, u)| {
            let what = |field: &str| format!("record {}: {field}", i + 1);
            Ok(TraceRequest {
                arrival: 0.0,
                prompt_len: length_at(path, None, &what("prompt_tokens"), u.prompt_tokens)?,
                output_len: length_at(path, None, &what("completion_tokens"), u.completion_tokens)?,
                prefix_ids: Vec::new(),
            })
        })
        .collect()
}

/// CASTILLO rows hold ten sampled response lengths for one prompt; each row becomes one request
/// with the first sample, a real draw from that prompt's length distribution.
fn load_castillo(path: &Path) -> Result<Vec<TraceRequest>> {
    #[derive(Deserialize)]
    struct Row {
        input_size: i64,
        output_sizes: String,
    }
    let mut out = Vec::new();
    for (i, row) in csv_reader(path)?.deserialize::<Row>().enumerate() {
        let row = row.map_err(|e| csv_err(path, e))?;
        let line = i + 2;
        let first = row.output_sizes.split(';').next().unwrap_or("").trim();
        let output: i64 =
            first.parse().map_err(|_| err(path, Some(line), format!("bad output_sizes '{}'", row.output_sizes)))?;
        out.push(TraceRequest {
            arrival: 0.0,
            prompt_len: length(path, line, "input_size", row.input_size)?,
            output_len: length(path, line, "output size", output)?,
            prefix_ids: Vec::new(),
        });
    }
    Ok(out)
}

/// Mooncake timestamps are milliseconds and come in buckets; requests that share a timestamp are
/// spread evenly over the gap to the next distinct one, so a bucket does not land as one burst.
fn load_mooncake(path: &Path) -> Result<Vec<TraceRequest>> {
    #[derive(Deserialize)]
    struct Row {
        timestamp: f64,
        input_length: i64,
        output_length: i64,
        #[serde(default)]
        hash_ids: Vec<u64>,
    }
    let file = File::open(path).map_err(|e| err(path, None, e.to_string()))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| err(path, Some(n), e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let row: Row = serde_json::from_str(&line).map_err(|e| err(path, Some(n), e.to_string()))?;
        if !row.timestamp.is_finite() || row.timestamp < 0.0 {
            return Err(err(path, Some(n), format!("bad timestamp {}", row.timestamp)));
        }
        out.push(TraceRequest {
            arrival: row.timestamp / 1000.0,
            prompt_len: length(path, n, "input_length", row.input_length)?,
            output_len: length(path, n, "output_length", row.output_length)?,
            prefix_ids: row.hash_ids,
        });
    }
    out.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    spread_equal_timestamps(&mut out);
    Ok(out)
}

fn spread_equal_timestamps(reqs: &mut [TraceRequest]) {
    let distinct: Vec<f64> = {
        let mut d: Vec<f64> = reqs.iter().map(|r| r.arrival).collect();
        d.dedup();
        d
    };
    if distinct.len() < 2 {
        return;
    }
    let mean_gap = (distinct[distinct.len() - 1] - distinct[0]) / (distinct.len() - 1) as f64;
    let mut i = 0;
    let mut next = 1;
    while i < reqs.len() {
        let t = reqs[i].arrival;
        let j = i + reqs[i..].iter().take_while(|r| r.arrival == t).count();
        let gap = if next < distinct.len() { distinct[next] - t } else { mean_gap };
        let k = j - i;
        for (m, r) in reqs[i..j].iter_mut().enumerate() {
            r.arrival = t + gap * m as f64 / k as f64;
        }
        i = j;
        next += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetime_parsing() {
        let a = parse_datetime("2023-11-16 18:17:03.9799600").unwrap();
        let b = parse_datetime("2023-11-17 00:00:00").unwrap();
        assert!((b - a - (5.0 * 3600.0 + 42.0 * 60.0 + 56.02004)).abs() < 1e-6);
        assert_eq!(parse_datetime("1970-01-01 00:00:00"), Some(0.0));
        assert!(parse_datetime("2023-13-01 00:00:00").is_none());
        assert!(parse_datetime("garbage").is_none());
    }

    #[test]
    fn usage_json_lists_load_and_bad_ones_are_refused() {
        let dir = std::env::temp_dir().join(format!("horae-usage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("o1.json");
        // The first two records of the paper's ShareGPT-o1.json (WuSiYu/lightllm-ae @ d93ff69c07d4).
        std::fs::write(&good, "[\n {\"completion_tokens\": 1822, \"prompt_tokens\": 40, \"total_tokens\": 1862, \"reasoning_tokens\": 1024},\n {\"completion_tokens\": 976, \"prompt_tokens\": 24, \"total_tokens\": 1000, \"reasoning_tokens\": 768}\n]").unwrap();
        let t = load_trace(&good, None).unwrap();
        assert!(!t.timed);
        assert_eq!(
            t.requests.iter().map(|r| (r.prompt_len, r.output_len)).collect::<Vec<_>>(),
            vec![(40, 1822), (24, 976)]
        );
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "[{\"prompt_tokens\": 5, \"completion_tokens\": 0}]").unwrap();
        assert!(load_trace(&bad, None)
            .unwrap_err()
            .to_string()
            .contains("record 1: completion_tokens must be positive"));
        std::fs::write(&bad, "[{\"prompt_tokens\": 5}]").unwrap();
        assert!(load_trace(&bad, None).unwrap_err().to_string().contains("completion_tokens"));
        std::fs::write(&bad, "[1, 2").unwrap();
        assert!(load_trace(&bad, None).unwrap_err().to_string().contains("not a JSON list"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn equal_timestamps_are_spread() {
        let r = |t: f64| TraceRequest { arrival: t, prompt_len: 1, output_len: 1, prefix_ids: vec![] };
        let mut v = vec![r(0.0), r(0.0), r(0.0), r(3.0), r(6.0), r(6.0)];
        spread_equal_timestamps(&mut v);
        let got: Vec<f64> = v.iter().map(|x| x.arrival).collect();
        assert_eq!(got, vec![0.0, 1.0, 2.0, 3.0, 6.0, 7.5]);
    }
}
