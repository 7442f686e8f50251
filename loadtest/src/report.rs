//! A scenario run's results: what each level measured, as written to `<name>.json`, and the
//! summary table printed while it runs. Latencies are client-measured, in milliseconds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::quantile;

/// The whole run, as written to `<out>/<scenario>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResults {
    pub scenario: String,
    pub description: String,
    pub url: String,
    /// Unix seconds when the first level started.
    pub started_at_unix_s: u64,
    pub tool: String,
    pub seconds_per_level: f64,
    pub max_requests_per_level: usize,
    /// The scenario's traffic entries, in order; `levels[].traffic[i]` refers to `traffic[i]`.
    pub traffic: Vec<TrafficInfo>,
    pub levels: Vec<LevelResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrafficInfo {
    pub label: String,
    pub kind: String,
    pub model: String,
    pub weight: f64,
}

/// One concurrency level.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LevelResult {
    pub concurrency: usize,
    /// From the first request sent to the last answer received.
    pub seconds: f64,
    /// Requests answered successfully (2xx, whole body or whole stream).
    pub requests: usize,
    /// Failed requests by cause: an HTTP status (`"503"`), `"timeout"`, `"connect"`,
    /// `"broken"` (the connection or body broke off) or `"stream_error"` (an error event).
    pub errors: BTreeMap<String, usize>,
    /// Successful requests per second.
    pub requests_per_s: f64,
    /// Whole-request latency of successful requests, all traffic together.
    pub latency_ms: Percentiles,
    /// The same, per traffic entry (same order as `RunResults::traffic`).
    pub traffic: Vec<TrafficResult>,
}

impl LevelResult {
    pub fn error_count(&self) -> usize {
        self.errors.values().sum()
    }
}

/// One traffic entry within one level.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrafficResult {
    pub label: String,
    pub requests: usize,
    pub errors: BTreeMap<String, usize>,
    pub requests_per_s: f64,
    /// Embeddings: the whole request. Chat: the whole stream, first byte sent to `[DONE]`.
    pub latency_ms: Percentiles,
    /// Chat only: request sent → first content chunk.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ttft_ms: Option<Percentiles>,
    /// Chat only: time per output token after the first, per request:
    /// (last content chunk − first) / (completion tokens − 1).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tpot_ms: Option<Percentiles>,
    /// Chat only: completion tokens of successful streams (the server's usage count) per second.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub output_tokens_per_s: Option<f64>,
    /// Chat only: mean prompt tokens as the server counted them (chat template included).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub prompt_tokens_mean: Option<f64>,
}

/// Percentiles of a sample, in milliseconds; `null` in JSON when there was no sample.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
}

impl Percentiles {
    /// From unsorted values.
    pub fn of(values: &[f64]) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Percentiles {
            p50: Some(quantile(&sorted, 0.50)),
            p90: Some(quantile(&sorted, 0.90)),
            p99: Some(quantile(&sorted, 0.99)),
            max: sorted.last().copied(),
            mean: Some(sorted.iter().sum::<f64>() / sorted.len() as f64),
        }
    }

    /// The percentiles the chart and table show, by name.
    pub fn named(&self) -> [(&'static str, Option<f64>); 3] {
        [("p50", self.p50), ("p90", self.p90), ("p99", self.p99)]
    }
}

/// Writes `<dir>/<scenario>.json` and `<dir>/<scenario>.png`; returns their paths.
pub fn write(results: &RunResults, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join(format!("{}.json", results.scenario));
    let png = dir.join(format!("{}.png", results.scenario));
    let mut text = serde_json::to_string_pretty(results)?;
    text.push('\n');
    std::fs::write(&json, text).with_context(|| format!("writing {}", json.display()))?;
    crate::chart::draw(results, &png)?;
    Ok((json, png))
}

/// The summary table: a header, then one row per traffic entry per level.
pub fn table_header() -> String {
    format!(
        "{:<40} {:>5} {:>8} {:>14} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "traffic",
        "conc",
        "requests",
        "errors",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "tok/s",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99"
    )
}

pub fn table_rows(level: &LevelResult) -> Vec<String> {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    level
        .traffic
        .iter()
        .map(|t| {
            let errors = if t.errors.is_empty() {
                "0".to_string()
            } else {
                t.errors
                    .iter()
                    .map(|(k, v)| format!("{k}:{v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let ttft = t.ttft_ms.unwrap_or_default();
            let tpot = t.tpot_ms.unwrap_or_default();
            format!(
                "{:<40} {:>5} {:>8} {:>14} {:>8.1} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}",
                t.label,
                level.concurrency,
                t.requests,
                errors,
                t.requests_per_s,
                ms(t.latency_ms.p50),
                ms(t.latency_ms.p90),
                ms(t.latency_ms.p99),
                ms(t.output_tokens_per_s),
                ms(ttft.p50),
                ms(ttft.p99),
                ms(tpot.p50),
                ms(tpot.p99),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_ordered_and_empty_is_null() {
        let values: Vec<f64> = (1..=1000).rev().map(f64::from).collect();
        let p = Percentiles::of(&values);
        assert_eq!(p.p50, Some(501.0));
        assert_eq!(p.p90, Some(901.0));
        assert_eq!(p.p99, Some(991.0));
        assert_eq!(p.max, Some(1000.0));
        let empty = serde_json::to_value(Percentiles::of(&[])).unwrap();
        assert!(empty["p50"].is_null());
    }
}
