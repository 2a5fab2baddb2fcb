//! One model version's rolling window of telemetry and feedback, and what it says against
//! the model's policy. Pure: the service feeds it records and the clock.

use std::collections::VecDeque;

use lathe_model::artifact::DriftReference;
use lathe_proto::health::{FeatureDrift, HealthStatus, VersionHealth};
use lathe_proto::spec::MonitorParams;
use lathe_proto::{AlertKind, TelemetryRecord};

use crate::stats;

/// Requests a window needs before latency and error rate are judged.
pub const MIN_REQUESTS: u64 = 20;
/// Labelled rows a window needs before accuracy is judged.
pub const MIN_LABELLED: u64 = 30;
/// Sampled rows a window needs before drift is judged; below [`PSI_ROWS`] the KS test
/// decides instead of PSI (PSI's bins are too noisy on a small sample).
pub const MIN_SAMPLED: u64 = 20;
pub const PSI_ROWS: u64 = 100;
/// KS p-value under which a small sample's feature counts as drifted.
pub const KS_ALPHA: f64 = 0.001;

/// What the monitor keeps of a model version's training data and labels.
#[derive(Debug, Clone)]
pub struct ModelReference {
    pub feature_names: Vec<String>,
    pub class_labels: Vec<String>,
    pub drift: DriftReference,
}

#[derive(Debug, Clone)]
struct Sample {
    at_ms: u64,
    latency_us: u64,
    error: bool,
    rows: u32,
    predicted: Vec<u32>,
    inputs: Vec<Vec<f32>>,
}

#[derive(Debug, Clone)]
struct Labelled {
    at_ms: u64,
    correct: u64,
    total: u64,
}

/// A broken policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Breach {
    pub kind: AlertKind,
    pub figure: f64,
    pub threshold: f64,
    pub message: String,
    pub features: Vec<String>,
}

impl Breach {
    /// Latency, errors and accuracy make a version unfit to serve; drift is reported only.
    pub fn unfit(&self) -> bool {
        matches!(
            self.kind,
            AlertKind::Latency | AlertKind::ErrorRate | AlertKind::Accuracy
        )
    }
}

#[derive(Debug, Default, Clone)]
pub struct VersionWindow {
    samples: VecDeque<Sample>,
    labelled: VecDeque<Labelled>,
}

impl VersionWindow {
    pub fn push(&mut self, r: &TelemetryRecord) {
        self.samples.push_back(Sample {
            at_ms: r.at_ms,
            latency_us: r.latency_us,
            error: r.error.is_some(),
            rows: r.rows,
            predicted: r.predicted.clone(),
            inputs: r.sampled_inputs.clone(),
        });
    }

    pub fn push_labels(&mut self, at_ms: u64, correct: u64, total: u64) {
        self.labelled.push_back(Labelled {
            at_ms,
            correct,
            total,
        });
    }

    /// Forgets what is older than the window.
    pub fn prune(&mut self, now_ms: u64, window_ms: u64) {
        let cut = now_ms.saturating_sub(window_ms);
        while self.samples.front().is_some_and(|s| s.at_ms < cut) {
            self.samples.pop_front();
        }
        while self.labelled.front().is_some_and(|l| l.at_ms < cut) {
            self.labelled.pop_front();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty() && self.labelled.is_empty()
    }

    pub fn requests(&self) -> u64 {
        self.samples.len() as u64
    }

    /// The window's figures and every policy it breaks (`policy` None: figures only).
    pub fn judge(
        &self,
        version: u32,
        role: &str,
        reference: Option<&ModelReference>,
        policy: &MonitorParams,
        now_ms: u64,
    ) -> (VersionHealth, Vec<Breach>) {
        let requests = self.samples.len() as u64;
        let window_ms = u64::from(policy.window_secs) * 1000;
        let span_ms = self
            .samples
            .front()
            .map(|s| now_ms.saturating_sub(s.at_ms))
            .unwrap_or(0)
            .clamp(1000, window_ms.max(1000));
        let mut lat: Vec<f64> = self
            .samples
            .iter()
            .map(|s| s.latency_us as f64 / 1000.0)
            .collect();
        let p50 = stats::quantile(&mut lat, 0.5);
        let p95 = stats::quantile(&mut lat, 0.95);
        let p99 = stats::quantile(&mut lat, 0.99);
        let errors = self.samples.iter().filter(|s| s.error).count() as u64;
        let error_rate = if requests == 0 {
            0.0
        } else {
            errors as f64 / requests as f64
        };
        let (correct, labelled) = self
            .labelled
            .iter()
            .fold((0, 0), |(c, t), l| (c + l.correct, t + l.total));
        let accuracy = (labelled > 0).then(|| correct as f64 / labelled as f64);
        let n_classes = reference.map(|r| r.class_labels.len()).unwrap_or_else(|| {
            self.samples
                .iter()
                .flat_map(|s| s.predicted.iter())
                .max()
                .map(|&m| m as usize + 1)
                .unwrap_or(0)
        });
        let predicted_share = stats::shares(
            self.samples
                .iter()
                .flat_map(|s| s.predicted.iter().copied()),
            n_classes,
        );
        let predicted_rows: u64 = self.samples.iter().map(|s| s.predicted.len() as u64).sum();
        let prediction_psi = reference
            .filter(|r| {
                !r.drift.predicted_class_frequencies.is_empty() && predicted_rows >= PSI_ROWS
            })
            .map(|r| stats::psi(&predicted_share, &r.drift.predicted_class_frequencies));

        let inputs: Vec<&Vec<f32>> = self.samples.iter().flat_map(|s| s.inputs.iter()).collect();
        let sampled = inputs.len() as u64;
        let mut drifted = Vec::new();
        let mut max_psi: Option<f64> = None;
        if let Some(r) = reference
            && sampled >= MIN_SAMPLED
        {
            for (f, profile) in r.drift.features.iter().enumerate() {
                let column: Vec<f32> = inputs
                    .iter()
                    .filter_map(|row| row.get(f).copied())
                    .collect();
                if column.is_empty() || profile.proportions.is_empty() {
                    continue;
                }
                let psi = profile.psi(&column);
                let ks = profile.ks(&column);
                let p = stats::ks_p_value(ks, column.len() as u64, r.drift.rows);
                max_psi = Some(max_psi.map_or(psi, |m: f64| m.max(psi)));
                let is_drift = if sampled >= PSI_ROWS {
                    psi > policy.drift_psi
                } else {
                    p < KS_ALPHA
                };
                if is_drift {
                    drifted.push(FeatureDrift {
                        feature: r
                            .feature_names
                            .get(f)
                            .cloned()
                            .unwrap_or_else(|| format!("feature {f}")),
                        index: f as u32,
                        psi,
                        ks: Some(ks),
                        ks_p_value: Some(p),
                    });
                }
            }
            drifted.sort_by(|a, b| b.psi.total_cmp(&a.psi));
        }

        let mut breaches = Vec::new();
        let window = policy.window_secs;
        if requests >= MIN_REQUESTS {
            if let Some(limit) = policy.p99_latency_ms
                && p99 > limit
            {
                breaches.push(Breach {
                    kind: AlertKind::Latency,
                    figure: p99,
                    threshold: limit,
                    message: format!("v{version}: p99 latency {p99:.3} ms over {limit} ms in the last {window} s ({requests} requests)"),
                    features: vec![],
                });
            }
            if let Some(limit) = policy.max_error_rate
                && error_rate > limit
            {
                breaches.push(Breach {
                    kind: AlertKind::ErrorRate,
                    figure: error_rate,
                    threshold: limit,
                    message: format!("v{version}: error rate {:.2} % over {:.2} % in the last {window} s ({errors} of {requests})", error_rate * 100.0, limit * 100.0),
                    features: vec![],
                });
            }
        }
        if let (Some(limit), Some(acc)) = (policy.min_accuracy, accuracy)
            && labelled >= MIN_LABELLED
            && acc < limit
        {
            breaches.push(Breach {
                kind: AlertKind::Accuracy,
                figure: acc,
                threshold: limit,
                message: format!("v{version}: accuracy {:.2} % from feedback is under {:.2} % in the last {window} s ({labelled} labelled rows)", acc * 100.0, limit * 100.0),
                features: vec![],
            });
        }
        if !drifted.is_empty() {
            let names: Vec<String> = drifted.iter().map(|d| d.feature.clone()).collect();
            let worst = &drifted[0];
            breaches.push(Breach {
                kind: AlertKind::FeatureDrift,
                figure: worst.psi,
                threshold: policy.drift_psi,
                message: format!(
                    "v{version}: {} feature(s) drifted from the training data in the last {window} s ({sampled} sampled rows): {} (worst PSI {:.3} on {})",
                    names.len(),
                    names.join(", "),
                    worst.psi,
                    worst.feature
                ),
                features: names,
            });
        }
        if let Some(psi) = prediction_psi
            && psi > policy.drift_psi
        {
            breaches.push(Breach {
                kind: AlertKind::PredictionDrift,
                figure: psi,
                threshold: policy.drift_psi,
                message: format!("v{version}: the predicted-class mix drifted (PSI {psi:.3}) in the last {window} s"),
                features: vec![],
            });
        }
        let status = if requests == 0 {
            HealthStatus::Idle
        } else if breaches.is_empty() {
            HealthStatus::Healthy
        } else {
            HealthStatus::Breach
        };
        let rows: u64 = self.samples.iter().map(|s| u64::from(s.rows)).sum();
        let health = VersionHealth {
            version,
            role: role.to_string(),
            status,
            requests,
            rows,
            requests_per_sec: requests as f64 / (span_ms as f64 / 1000.0),
            p50_ms: p50,
            p95_ms: p95,
            p99_ms: p99,
            error_rate,
            accuracy,
            labelled_rows: labelled,
            predicted_share,
            prediction_psi,
            sampled_rows: sampled,
            drifted,
            max_feature_psi: max_psi,
        };
        (health, breaches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lathe_proto::ModelName;

    fn policy() -> MonitorParams {
        let mut p: MonitorParams = serde_json::from_value(serde_json::json!({})).unwrap();
        p.p99_latency_ms = Some(5.0);
        p.max_error_rate = Some(0.05);
        p.min_accuracy = Some(0.9);
        p
    }

    fn record(at_ms: u64, latency_us: u64, error: bool, input: Vec<f32>) -> TelemetryRecord {
        TelemetryRecord {
            schema_version: 1,
            model: "m".parse::<ModelName>().unwrap(),
            version: 1,
            at_ms,
            request_id: None,
            latency_us,
            rows: 1,
            predicted: if error { vec![] } else { vec![0] },
            error: error.then(|| "bad".to_string()),
            sampled_inputs: vec![input],
        }
    }

    fn reference() -> ModelReference {
        // Feature 0 uniform on 0..100, feature 1 constant 0.
        let rows: Vec<f32> = (0..1000).flat_map(|i| [(i % 100) as f32, 0.0]).collect();
        ModelReference {
            feature_names: vec!["a".into(), "b".into()],
            class_labels: vec!["x".into(), "y".into()],
            drift: DriftReference::from_rows(&rows, 2, vec![0.5, 0.5]),
        }
    }

    #[test]
    fn a_healthy_window_breaks_nothing() {
        let mut w = VersionWindow::default();
        for i in 0..200 {
            w.push(&record(10_000 + i, 800, false, vec![(i % 100) as f32, 0.0]));
        }
        w.push_labels(10_100, 95, 100);
        let r = reference();
        let (h, b) = w.judge(1, "active", Some(&r), &policy(), 10_300);
        assert!(
            b.iter().all(|b| b.kind == AlertKind::PredictionDrift),
            "{b:?}"
        );
        assert_eq!(h.requests, 200);
        assert!((h.p99_ms - 0.8).abs() < 1e-9);
        assert_eq!(h.accuracy, Some(0.95));
        assert!(h.drifted.is_empty(), "{:?}", h.drifted);
    }

    #[test]
    fn slow_failing_wrong_and_drifted_windows_are_named() {
        let mut w = VersionWindow::default();
        for i in 0..100 {
            // Every tenth request fails, all are slow, and feature b moved to 50.
            w.push(&record(
                1_000 + i,
                9_000,
                i % 10 == 0,
                vec![(i % 100) as f32, 50.0],
            ));
        }
        w.push_labels(1_050, 50, 100);
        let r = reference();
        let (h, b) = w.judge(2, "canary", Some(&r), &policy(), 1_200);
        let kinds: Vec<AlertKind> = b.iter().map(|b| b.kind).collect();
        assert!(kinds.contains(&AlertKind::Latency), "{kinds:?}");
        assert!(kinds.contains(&AlertKind::ErrorRate), "{kinds:?}");
        assert!(kinds.contains(&AlertKind::Accuracy), "{kinds:?}");
        let drift = b
            .iter()
            .find(|b| b.kind == AlertKind::FeatureDrift)
            .unwrap();
        assert_eq!(drift.features, vec!["b".to_string()]);
        assert_eq!(h.status, HealthStatus::Breach);
        assert!(b.iter().filter(|b| b.unfit()).count() == 3);
    }

    #[test]
    fn old_records_leave_the_window() {
        let mut w = VersionWindow::default();
        w.push(&record(1_000, 1, false, vec![0.0, 0.0]));
        w.push(&record(70_000, 1, false, vec![0.0, 0.0]));
        w.prune(75_000, 60_000);
        assert_eq!(w.requests(), 1);
    }
}
