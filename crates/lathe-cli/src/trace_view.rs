//! `lathe trace`: a job's waterfall in the terminal, drawn from the span timings kept in its
//! job record (no tracing backend needed) or from Jaeger's query API (`/api/v3/traces/<id>`).

use lathe_proto::JobRecord;

/// One row of the waterfall.
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    pub name: String,
    pub service: String,
    pub start_ms: f64,
    pub end_ms: f64,
}

/// The rows of a job from its record: the job itself, intake, and for each step the time its
/// task waited in the queue and the time the stage worked on it.
pub fn from_record(r: &JobRecord) -> Vec<Bar> {
    let end = r.finished_at_ms.unwrap_or(r.updated_at_ms) as f64;
    let mut bars = vec![Bar {
        name: format!("job {}", r.name),
        service: "lathe".into(),
        start_ms: r.submitted_at_ms as f64,
        end_ms: end,
    }];
    let mut previous_end = r.submitted_at_ms as f64;
    for span in r.spans.iter().filter(|s| s.stage.is_none()) {
        bars.push(Bar {
            name: span.name.clone(),
            service: span.service.clone(),
            start_ms: span.start_unix_ms as f64,
            end_ms: span.end_unix_ms as f64,
        });
        previous_end = previous_end.max(span.end_unix_ms as f64);
    }
    for step in &r.steps {
        let Some(started) = step.started_at_ms else {
            break;
        };
        let started = started as f64;
        bars.push(Bar {
            name: format!("queued lathe.work.{}", step.stage),
            service: "nats".into(),
            start_ms: previous_end.min(started),
            end_ms: started,
        });
        let finished = step.finished_at_ms.map(|f| f as f64).unwrap_or(end);
        bars.push(Bar {
            name: format!("process lathe.work.{}", step.stage),
            service: step.stage.service_name().into(),
            start_ms: started,
            end_ms: finished,
        });
        previous_end = finished;
    }
    bars
}

fn str_attr(attrs: &serde_json::Value, key: &str) -> Option<String> {
    attrs
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .and_then(|a| a["value"]["stringValue"].as_str().map(String::from))
}

/// An OTLP JSON timestamp (nanoseconds, written as a string) in milliseconds. Parsed as an
/// integer first: nanoseconds since 1970 do not fit an f64 exactly.
fn millis(v: &serde_json::Value) -> Option<f64> {
    let nanos = v
        .as_str()
        .and_then(|s| s.parse::<u64>().ok())
        .or_else(|| v.as_u64())?;
    Some((nanos / 1_000) as f64 / 1_000.0)
}

/// The rows of a trace as Jaeger v2's query API returns it (`{"result": {"resourceSpans": …}}`,
/// OTLP JSON), in start order.
pub fn from_jaeger_v3(body: &serde_json::Value) -> anyhow::Result<Vec<Bar>> {
    let resource_spans = body["result"]["resourceSpans"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("the Jaeger response has no result.resourceSpans"))?;
    let mut bars = Vec::new();
    for rs in resource_spans {
        let service =
            str_attr(&rs["resource"]["attributes"], "service.name").unwrap_or_else(|| "?".into());
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for span in ss["spans"].as_array().into_iter().flatten() {
                let (Some(start), Some(end)) = (
                    millis(&span["startTimeUnixNano"]),
                    millis(&span["endTimeUnixNano"]),
                ) else {
                    continue;
                };
                bars.push(Bar {
                    name: span["name"].as_str().unwrap_or("?").to_string(),
                    service: service.clone(),
                    start_ms: start,
                    end_ms: end,
                });
            }
        }
    }
    anyhow::ensure!(!bars.is_empty(), "the trace has no spans");
    bars.sort_by(|a, b| {
        a.start_ms
            .total_cmp(&b.start_ms)
            .then(b.end_ms.total_cmp(&a.end_ms))
    });
    Ok(bars)
}

fn duration(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}

/// Draws the rows as a waterfall `width` characters wide.
pub fn render(bars: &[Bar], width: usize) -> String {
    let t0 = bars
        .iter()
        .map(|b| b.start_ms)
        .fold(f64::INFINITY, f64::min);
    let t1 = bars
        .iter()
        .map(|b| b.end_ms)
        .fold(f64::NEG_INFINITY, f64::max);
    let span = (t1 - t0).max(1.0);
    let name_w = bars
        .iter()
        .map(|b| b.name.chars().count())
        .max()
        .unwrap_or(4)
        .min(40);
    let service_w = bars.iter().map(|b| b.service.len()).max().unwrap_or(4);
    let mut out = String::new();
    for b in bars {
        let from = (((b.start_ms - t0) / span) * width as f64).floor() as usize;
        let to = ((((b.end_ms - t0) / span) * width as f64).ceil() as usize)
            .clamp(from + 1, width.max(from + 1));
        let line: String = (0..width)
            .map(|i| if i >= from && i < to { '█' } else { ' ' })
            .collect();
        out.push_str(&format!(
            "{:<name_w$}  {:<service_w$}  |{line}| {:>9}  +{}\n",
            b.name,
            b.service,
            duration(b.end_ms - b.start_ms),
            duration(b.start_ms - t0),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_jaeger_v3_trace_is_drawn_in_start_order() {
        let body: serde_json::Value =
            serde_json::from_str(include_str!("../tests/fixtures/jaeger_v3_trace.json")).unwrap();
        let bars = from_jaeger_v3(&body).unwrap();
        let names: Vec<&str> = bars.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "job digits",
                "process lathe.jobs.submit",
                "publish lathe.work.train",
                "process lathe.work.train",
                "store artifact"
            ]
        );
        assert_eq!(bars[3].service, "lathe-trainer");
        assert!((bars[3].end_ms - bars[3].start_ms - 1450.0).abs() < 1e-3);
        let text = render(&bars, 40);
        assert_eq!(text.lines().count(), 5);
        assert!(
            text.lines().next().unwrap().contains(&"█".repeat(40)),
            "the root spans the whole width:\n{text}"
        );
    }

    #[test]
    fn a_response_without_spans_is_an_error() {
        let err =
            from_jaeger_v3(&serde_json::json!({"result": {"resourceSpans": []}})).unwrap_err();
        assert!(err.to_string().contains("no spans"));
        let err = from_jaeger_v3(&serde_json::json!({"error": {"message": "trace not found"}}))
            .unwrap_err();
        assert!(err.to_string().contains("resourceSpans"));
    }
}
