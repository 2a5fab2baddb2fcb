//! Inference requests as they arrive on `lathe.infer.<model>` or the HTTP front: lathe's own
//! shape (`{"inputs": [..]}` one row, `{"inputs": [[..], ..]}` a batch; JSON or MessagePack)
//! or the Open Inference Protocol's (KServe v2), and the replies in the matching shape.
//! Every refusal is an [`InferError`] with a code and a message naming the problem.

use lathe_model::engine::Prediction;
use lathe_proto::oip::{self, OipRequest, OipResponse, OipTensor};
use lathe_proto::{Format, InferReply, ModelName, RowPrediction, codec};
use serde_json::Value;

/// A refused request: an HTTP-like code and a message for the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct InferError {
    pub code: u16,
    pub message: String,
}

impl InferError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        InferError {
            code: 400,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        InferError {
            code: 404,
            message: message.into(),
        }
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        InferError {
            code: 413,
            message: message.into(),
        }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        InferError {
            code: 503,
            message: message.into(),
        }
    }
}

/// Which shape the caller spoke, so the reply speaks it too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Lathe(Format),
    Oip,
}

/// A decoded request: raw feature rows, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed {
    pub id: Option<String>,
    pub rows: Vec<f32>,
    pub n_rows: usize,
    pub shape: Shape,
}

/// Limits a replica enforces before it computes anything.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_batch_rows: usize,
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn number(v: &Value, at: impl Fn() -> String) -> Result<f32, InferError> {
    match v.as_f64() {
        Some(x) if x.is_finite() && x.abs() <= f32::MAX as f64 => Ok(x as f32),
        Some(x) => Err(InferError::bad_request(format!(
            "{}: {x} is not a finite 32-bit number",
            at()
        ))),
        None => Err(InferError::bad_request(format!(
            "{}: expected a number, got {}{}",
            at(),
            kind_of(v),
            match v {
                Value::String(s) => format!(" \"{}\"", s.chars().take(20).collect::<String>()),
                _ => String::new(),
            }
        ))),
    }
}

/// Decodes a request's bytes; `n_features` is the model's input width.
pub fn parse(
    bytes: &[u8],
    content_type: Option<&str>,
    n_features: usize,
    limits: Limits,
) -> Result<Parsed, InferError> {
    if bytes.is_empty() {
        return Err(InferError::bad_request(
            "empty request: expected {\"inputs\": [..]} as JSON or MessagePack",
        ));
    }
    let format = Format::sniff(bytes, content_type);
    if let Some(parsed) = fast_path(bytes, format, n_features, limits) {
        return Ok(parsed);
    }
    let value: Value = match format {
        Format::Json => serde_json::from_slice(bytes)
            .map_err(|e| InferError::bad_request(format!("request is not valid JSON: {e}")))?,
        Format::MsgPack => rmp_serde::from_slice(bytes).map_err(|e| {
            InferError::bad_request(format!("request is not valid MessagePack: {e}"))
        })?,
    };
    if format == Format::Json && oip::is_oip(&value) {
        return parse_oip(value, n_features, limits);
    }
    parse_lathe(value, format, n_features, limits)
}

/// lathe's own shape decoded straight into numbers, for the common well-formed request.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Fast {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    id: Option<String>,
    inputs: FastInputs,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum FastInputs {
    Row(Vec<f32>),
    Batch(Vec<Vec<f32>>),
}

/// Decodes a well-formed request in lathe's shape without building a generic value; `None`
/// for anything else (another shape, or a fault), which the careful path then decodes and,
/// when it is wrong, explains field by field.
fn fast_path(bytes: &[u8], format: Format, n_features: usize, limits: Limits) -> Option<Parsed> {
    let fast: Fast = match format {
        Format::Json => serde_json::from_slice(bytes).ok()?,
        Format::MsgPack => rmp_serde::from_slice(bytes).ok()?,
    };
    if fast
        .schema_version
        .is_some_and(|v| v != lathe_proto::SCHEMA_VERSION)
    {
        return None;
    }
    let (rows, n_rows) = match fast.inputs {
        FastInputs::Row(r) => (r, 1),
        FastInputs::Batch(b) => {
            let n = b.len();
            if b.iter().any(|r| r.len() != n_features) {
                return None;
            }
            (b.concat(), n)
        }
    };
    if rows.len() != n_rows * n_features
        || n_rows == 0
        || n_rows > limits.max_batch_rows
        || !rows.iter().all(|v| v.is_finite())
    {
        return None;
    }
    Some(Parsed {
        id: fast.id,
        rows,
        n_rows,
        shape: Shape::Lathe(format),
    })
}

fn check_batch(n_rows: usize, limits: Limits) -> Result<(), InferError> {
    if n_rows == 0 {
        return Err(InferError::bad_request("inputs: the batch has no rows"));
    }
    if n_rows > limits.max_batch_rows {
        return Err(InferError::too_large(format!(
            "inputs: a batch of {n_rows} rows is over this server's limit of {} (LATHE_MAX_BATCH)",
            limits.max_batch_rows
        )));
    }
    Ok(())
}

fn parse_lathe(
    value: Value,
    format: Format,
    n_features: usize,
    limits: Limits,
) -> Result<Parsed, InferError> {
    let Value::Object(mut map) = value else {
        return Err(InferError::bad_request(format!(
            "request: expected an object with `inputs`, got {}",
            kind_of(&value)
        )));
    };
    let id = match map.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            return Err(InferError::bad_request(format!(
                "id: expected a string, got {}",
                kind_of(&other)
            )));
        }
    };
    if let Some(v) = map.remove("schema_version")
        && v.as_u64() != Some(lathe_proto::SCHEMA_VERSION as u64)
    {
        return Err(InferError::bad_request(format!(
            "schema_version: {v} is not supported (this server reads {})",
            lathe_proto::SCHEMA_VERSION
        )));
    }
    let inputs = map
        .remove("inputs")
        .ok_or_else(|| InferError::bad_request("inputs: missing (one row or a list of rows)"))?;
    if let Some(extra) = map.keys().next() {
        return Err(InferError::bad_request(format!(
            "{extra}: unknown field (expected `inputs` and optionally `id`)"
        )));
    }
    let Value::Array(items) = inputs else {
        return Err(InferError::bad_request(format!(
            "inputs: expected a list of numbers or of rows, got {}",
            kind_of(&inputs)
        )));
    };
    let batch = items.first().is_some_and(Value::is_array);
    let n_rows = if batch { items.len() } else { 1 };
    check_batch(n_rows, limits)?;
    let mut rows = Vec::with_capacity(n_rows * n_features);
    if batch {
        for (r, row) in items.iter().enumerate() {
            let Value::Array(vals) = row else {
                return Err(InferError::bad_request(format!(
                    "inputs[{r}]: expected a row (a list of numbers), got {}",
                    kind_of(row)
                )));
            };
            check_width(vals.len(), n_features, || format!("inputs[{r}]"))?;
            for (c, v) in vals.iter().enumerate() {
                rows.push(number(v, || format!("inputs[{r}][{c}]"))?);
            }
        }
    } else {
        check_width(items.len(), n_features, || "inputs".to_string())?;
        for (c, v) in items.iter().enumerate() {
            rows.push(number(v, || format!("inputs[{c}]"))?);
        }
    }
    Ok(Parsed {
        id,
        rows,
        n_rows,
        shape: Shape::Lathe(format),
    })
}

fn check_width(got: usize, want: usize, at: impl Fn() -> String) -> Result<(), InferError> {
    if got != want {
        return Err(InferError::bad_request(format!(
            "{}: expected {want} features, got {got}",
            at()
        )));
    }
    Ok(())
}

fn flatten(v: &Value, out: &mut Vec<f32>, path: &mut Vec<usize>) -> Result<(), InferError> {
    match v {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(i);
                flatten(item, out, path)?;
                path.pop();
            }
            Ok(())
        }
        other => {
            let x = number(other, || {
                let idx: Vec<String> = path.iter().map(|i| i.to_string()).collect();
                format!("inputs[0].data[{}]", idx.join("]["))
            })?;
            out.push(x);
            Ok(())
        }
    }
}

fn parse_oip(value: Value, n_features: usize, limits: Limits) -> Result<Parsed, InferError> {
    let req: OipRequest = serde_json::from_value(value)
        .map_err(|e| InferError::bad_request(format!("Open Inference Protocol request: {e}")))?;
    if req.inputs.len() != 1 {
        return Err(InferError::bad_request(format!(
            "inputs: expected one input tensor, got {}",
            req.inputs.len()
        )));
    }
    let t = &req.inputs[0];
    const TYPES: [&str; 6] = ["FP32", "FP64", "FP16", "INT32", "INT64", "INT16"];
    if !TYPES.contains(&t.datatype.as_str()) {
        return Err(InferError::bad_request(format!(
            "inputs[0].datatype: `{}` is not a numeric type this model takes ({})",
            t.datatype,
            TYPES.join(", ")
        )));
    }
    let (n_rows, width) = match t.shape.as_slice() {
        [w] => (1, *w),
        [r, w] => (*r, *w),
        other => {
            return Err(InferError::bad_request(format!(
                "inputs[0].shape: expected [rows, {n_features}] or [{n_features}], got {other:?}"
            )));
        }
    };
    if n_rows < 0 || width < 0 {
        return Err(InferError::bad_request(format!(
            "inputs[0].shape: {:?} has a negative size",
            t.shape
        )));
    }
    check_width(width as usize, n_features, || "inputs[0].shape".to_string())?;
    check_batch(n_rows as usize, limits)?;
    let mut rows = Vec::with_capacity(n_rows as usize * n_features);
    flatten(&t.data, &mut rows, &mut Vec::new())?;
    let want = n_rows as usize * n_features;
    if rows.len() != want {
        return Err(InferError::bad_request(format!(
            "inputs[0].data: shape {:?} needs {want} values, got {}",
            t.shape,
            rows.len()
        )));
    }
    Ok(Parsed {
        id: req.id,
        rows,
        n_rows: n_rows as usize,
        shape: Shape::Oip,
    })
}

/// The reply's bytes in the shape of the request, and its content type.
pub fn encode_reply(
    parsed: &Parsed,
    model: &ModelName,
    version: u32,
    labels: &[String],
    predictions: &[Prediction],
) -> (Vec<u8>, &'static str) {
    match parsed.shape {
        Shape::Oip => {
            let n = predictions.len() as i64;
            let k = labels.len() as i64;
            let resp = OipResponse {
                model_name: model.to_string(),
                model_version: version.to_string(),
                id: parsed.id.clone(),
                parameters: Some(serde_json::json!({
                    "labels": predictions.iter().map(|p| labels.get(p.class).cloned().unwrap_or_default()).collect::<Vec<_>>(),
                })),
                outputs: vec![
                    OipTensor {
                        name: "predicted_class".into(),
                        shape: vec![n],
                        datatype: "INT64".into(),
                        parameters: None,
                        data: Value::from(
                            predictions
                                .iter()
                                .map(|p| p.class as i64)
                                .collect::<Vec<_>>(),
                        ),
                    },
                    OipTensor {
                        name: "probabilities".into(),
                        shape: vec![n, k],
                        datatype: "FP32".into(),
                        parameters: None,
                        data: Value::from(
                            predictions
                                .iter()
                                .flat_map(|p| p.probabilities.iter().map(|&x| x as f64))
                                .collect::<Vec<_>>(),
                        ),
                    },
                ],
            };
            (
                serde_json::to_vec(&resp).unwrap_or_default(),
                "application/json",
            )
        }
        Shape::Lathe(format) => {
            let reply = InferReply {
                schema_version: lathe_proto::SCHEMA_VERSION,
                id: parsed.id.clone(),
                model: model.clone(),
                version,
                predictions: predictions
                    .iter()
                    .map(|p| RowPrediction {
                        class: p.class as u32,
                        label: labels.get(p.class).cloned().unwrap_or_default(),
                        probabilities: p.probabilities.clone(),
                    })
                    .collect(),
            };
            match format {
                Format::Json => (codec::to_json(&reply), "application/json"),
                Format::MsgPack => (codec::to_msgpack(&reply), "application/msgpack"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits { max_batch_rows: 4 };

    fn err(bytes: &str) -> InferError {
        parse(bytes.as_bytes(), None, 3, L).unwrap_err()
    }

    #[test]
    fn rows_batches_and_oip() {
        let p = parse(br#"{"inputs":[1,2,3],"id":"a"}"#, None, 3, L).unwrap();
        assert_eq!(
            (p.n_rows, p.rows, p.id.as_deref()),
            (1, vec![1.0, 2.0, 3.0], Some("a"))
        );
        let p = parse(br#"{"inputs":[[1,2,3],[4,5,6]]}"#, None, 3, L).unwrap();
        assert_eq!(p.n_rows, 2);
        let oip = br#"{"id":"x","inputs":[{"name":"input-0","shape":[2,3],"datatype":"FP32","data":[1,2,3,4,5,6]}]}"#;
        let p = parse(oip, None, 3, L).unwrap();
        assert_eq!((p.n_rows, p.shape), (2, Shape::Oip));
        let nested =
            br#"{"inputs":[{"name":"i","shape":[1,3],"datatype":"FP64","data":[[1,2,3]]}]}"#;
        assert_eq!(parse(nested, None, 3, L).unwrap().rows, vec![1.0, 2.0, 3.0]);
        let mp = rmp_serde::to_vec_named(&serde_json::json!({"inputs": [1.0, 2.0, 3.0]})).unwrap();
        let p = parse(&mp, Some("application/msgpack"), 3, L).unwrap();
        assert_eq!(p.shape, Shape::Lathe(Format::MsgPack));
    }

    #[test]
    fn the_fast_path_agrees_with_the_careful_one() {
        let requests = [
            r#"{"inputs":[1,2,3],"id":"a"}"#,
            r#"{"inputs":[[1,2,3],[4,5.5,-6]],"schema_version":1}"#,
            r#"{"id":null,"inputs":[0.25,0,1e3]}"#,
        ];
        for text in requests {
            let fast = fast_path(text.as_bytes(), Format::Json, 3, L).expect("well-formed");
            let value: Value = serde_json::from_str(text).unwrap();
            let careful = parse_lathe(value, Format::Json, 3, L).unwrap();
            assert_eq!(fast, careful, "{text}");
        }
        // Faults fall through to the careful path, which names them.
        for text in [
            r#"{"inputs":[1,2]}"#,
            r#"{"inputs":[1,2,"x"]}"#,
            r#"{"inputs":[],"x":1}"#,
        ] {
            assert!(
                fast_path(text.as_bytes(), Format::Json, 3, L).is_none(),
                "{text}"
            );
        }
    }

    #[test]
    fn refusals_name_the_problem() {
        assert!(
            err(r#"{"inputs":[1,2]}"#)
                .message
                .contains("expected 3 features, got 2")
        );
        let e = err(r#"{"inputs":[[1,2,3],[1,"x",3]]}"#);
        assert_eq!(e.code, 400);
        assert!(
            e.message
                .contains("inputs[1][1]: expected a number, got a string"),
            "{e}"
        );
        let e = err(r#"{"inputs":[[1,2,3],[1,2,3],[1,2,3],[1,2,3],[1,2,3]]}"#);
        assert_eq!(e.code, 413);
        assert!(e.message.contains("limit of 4"), "{e}");
        assert!(err("{not json").message.contains("not valid JSON"));
        assert!(
            err(r#"{"rows":[1,2,3]}"#)
                .message
                .contains("inputs: missing")
        );
        assert!(
            err(r#"{"inputs":[1,2,3],"x":1}"#)
                .message
                .contains("x: unknown field")
        );
        let e = err(r#"{"inputs":[{"name":"i","shape":[1,3],"datatype":"BYTES","data":["a"]}]}"#);
        assert!(e.message.contains("inputs[0].datatype"), "{e}");
        let e = err(r#"{"inputs":[{"name":"i","shape":[2,3],"datatype":"FP32","data":[1,2,3]}]}"#);
        assert!(e.message.contains("needs 6 values, got 3"), "{e}");
        assert_eq!(parse(b"", None, 3, L).unwrap_err().code, 400);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const W: usize = 5;
        const LIMIT: Limits = Limits { max_batch_rows: 8 };
        const CONTENT_TYPES: [Option<&str>; 3] =
            [None, Some("application/json"), Some("application/msgpack")];

        /// What every accepted request must satisfy, whatever its bytes were.
        fn check_accepted(p: &Parsed) -> Result<(), TestCaseError> {
            prop_assert!(p.n_rows >= 1 && p.n_rows <= LIMIT.max_batch_rows);
            prop_assert_eq!(p.rows.len(), p.n_rows * W);
            prop_assert!(p.rows.iter().all(|x| x.is_finite()));
            Ok(())
        }

        fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
            for ct in CONTENT_TYPES {
                match parse(bytes, ct, W, LIMIT) {
                    Ok(p) => check_accepted(&p)?,
                    Err(e) => {
                        prop_assert!([400, 413].contains(&e.code) && !e.message.is_empty(), "{e}")
                    }
                }
            }
            Ok(())
        }

        fn oip(rows: &[Vec<f32>], shape: Vec<i64>, nested: bool) -> Vec<u8> {
            let data = if nested {
                serde_json::json!(rows)
            } else {
                serde_json::json!(rows.iter().flatten().collect::<Vec<_>>())
            };
            serde_json::to_vec(&serde_json::json!({
                "id": "r1",
                "inputs": [{"name": "input-0", "shape": shape, "datatype": "FP32", "data": data}]
            }))
            .unwrap()
        }

        fn valid_requests(rows: &[Vec<f32>]) -> Vec<(Vec<u8>, Vec<f32>)> {
            let flat: Vec<f32> = rows.iter().flatten().copied().collect();
            let one = rows[0].clone();
            let lathe_row = serde_json::json!({"id": "a", "inputs": one});
            let lathe_batch = serde_json::json!({"inputs": rows, "schema_version": 1});
            vec![
                (serde_json::to_vec(&lathe_row).unwrap(), one.clone()),
                (serde_json::to_vec(&lathe_batch).unwrap(), flat.clone()),
                (rmp_serde::to_vec_named(&lathe_row).unwrap(), one.clone()),
                (rmp_serde::to_vec_named(&lathe_batch).unwrap(), flat.clone()),
                (oip(&rows[..1], vec![W as i64], false), one),
                (
                    oip(rows, vec![rows.len() as i64, W as i64], false),
                    flat.clone(),
                ),
                (oip(rows, vec![rows.len() as i64, W as i64], true), flat),
            ]
        }

        fn finite_row() -> impl Strategy<Value = Vec<f32>> {
            proptest::collection::vec(
                prop_oneof![
                    any::<f32>().prop_filter("finite", |x| x.is_finite()),
                    (-20i32..20).prop_map(|x| x as f32),
                ],
                W,
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn arbitrary_bytes_are_refused_or_well_formed(
                bytes in proptest::collection::vec(any::<u8>(), 0..256),
            ) {
                check(&bytes)?;
            }

            #[test]
            fn valid_random_rows_round_trip_in_every_shape(
                rows in proptest::collection::vec(finite_row(), 1..=LIMIT.max_batch_rows),
            ) {
                for (bytes, want) in valid_requests(&rows) {
                    for ct in CONTENT_TYPES {
                        // A wrong Content-Type must be refused, never misread.
                        let json = bytes[0] == b'{';
                        let mismatched = matches!((ct, json), (Some(c), true) if c.contains("msgpack"))
                            || matches!((ct, json), (Some(c), false) if c.contains("json"));
                        match parse(&bytes, ct, W, LIMIT) {
                            Ok(p) => {
                                prop_assert!(!mismatched, "{ct:?} misread");
                                prop_assert_eq!(p.n_rows, want.len() / W);
                                prop_assert_eq!(&p.rows, &want);
                            }
                            Err(e) => prop_assert!(mismatched, "{ct:?}: {e}"),
                        }
                    }
                }
            }

            #[test]
            fn mutated_requests_are_refused_or_well_formed(
                rows in proptest::collection::vec(finite_row(), 1..4),
                edits in proptest::collection::vec(
                    (any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
            ) {
                for (original, _) in valid_requests(&rows) {
                    let mut bytes = original.clone();
                    for (at, byte, op) in &edits {
                        let i = at.index(bytes.len().max(1)).min(bytes.len());
                        match op {
                            0 if i < bytes.len() => bytes[i] ^= 1 << (byte % 8),
                            1 if i < bytes.len() => bytes[i] = *byte,
                            2 => bytes.truncate(i),
                            _ => bytes.insert(i, *byte),
                        }
                        check(&bytes)?;
                    }
                }
            }
        }
    }
}
