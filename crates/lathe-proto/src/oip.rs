//! The Open Inference Protocol (KServe v2) shapes `lathe.infer.<model>` and the deployer's
//! HTTP front also accept, so that clients written for KServe, Seldon or Triton work as
//! they are. Only what an MLP classifier needs: one FP32/FP64/INT input tensor of shape
//! `[rows, features]` (or `[features]`), and two outputs: the predicted class of each row
//! and the class probabilities.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One named tensor. `data` is flat, row-major (nested arrays are accepted too).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OipTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
    pub data: serde_json::Value,
}

/// An inference request in the Open Inference Protocol's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OipRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
    pub inputs: Vec<OipTensor>,
    /// Requested outputs; every output is returned whatever is asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<serde_json::Value>,
}

/// The response: `predicted_class` (`INT64`, `[rows]`) and `probabilities` (`FP32`,
/// `[rows, classes]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OipResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
    pub outputs: Vec<OipTensor>,
}

/// The OIP metadata of a model (`GET /v2/models/<name>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OipModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<OipTensorMetadata>,
    pub outputs: Vec<OipTensorMetadata>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OipTensorMetadata {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// Whether a JSON request is in the OIP shape: `inputs` is a list of tensor objects.
pub fn is_oip(value: &serde_json::Value) -> bool {
    value
        .get("inputs")
        .and_then(|i| i.as_array())
        .and_then(|a| a.first())
        .is_some_and(|t| t.is_object())
}
