//! The job spec: what a user publishes to `lathe.jobs.submit`, every stage's parameters with
//! their defaults, and the validation that names every bad field and why.
//!
//! Unknown fields are refused rather than ignored: a misspelt setting that silently does
//! nothing is the complaint users file most about today's tools.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::codec::{self, Format};
use crate::ids::{ModelName, Stage};

/// One bad field of a spec (or message): its dotted path and the reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `train.epochs` or `pipeline[2]`; `.` for the whole message.
    pub field: String,
    /// Why the value is refused.
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Either the word `"auto"` (lathe searches for the value inside the job's accuracy budget)
/// or a fixed value.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AutoOr<T> {
    #[serde(serialize_with = "ser_auto")]
    Auto,
    Value(T),
}

fn ser_auto<S: serde::Serializer>(s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("auto")
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for AutoOr<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw<T> {
            Word(String),
            Value(T),
        }
        match Raw::<T>::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected \"auto\" or a number"))?
        {
            Raw::Word(w) if w == "auto" => Ok(AutoOr::Auto),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "expected \"auto\" or a number, got \"{w}\""
            ))),
            Raw::Value(v) => Ok(AutoOr::Value(v)),
        }
    }
}

impl<T: JsonSchema> JsonSchema for AutoOr<T> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        format!("AutoOr_{}", T::schema_name()).into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let inner = generator.subschema_for::<T>();
        schemars::json_schema!({
            "description": "\"auto\" (searched inside the accuracy budget) or a fixed value",
            "oneOf": [ { "const": "auto" }, inner ]
        })
    }
}

/// A job spec as published by a user. Every field but `name` and `dataset` has a default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Version of this message's schema; a newer one than the build knows is refused.
    #[serde(default = "default_schema_version")]
    pub schema_version: u32,
    /// A label for people; need not be unique.
    pub name: String,
    /// Where the training data comes from and how it is split.
    pub dataset: DatasetSpec,
    /// The model to train, or the model to start from when the pipeline has no `train`.
    #[serde(default)]
    pub model: ModelSpec,
    /// Training parameters.
    #[serde(default)]
    pub train: TrainParams,
    /// The stages to run, in the canonical order train, distill, prune, quantize, deploy, monitor.
    #[serde(default = "default_pipeline")]
    pub pipeline: Vec<Stage>,
    /// Distillation parameters (only with `distill` in the pipeline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillParams>,
    /// Pruning parameters (only with `prune` in the pipeline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<PruneParams>,
    /// Quantization parameters (only with `quantize` in the pipeline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<QuantizeParams>,
    /// How much accuracy compression may cost, against the trained model.
    #[serde(default)]
    pub budget: Budget,
    /// Deployment target and gates (required with `deploy` in the pipeline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<DeployParams>,
    /// Monitoring policy (only with `monitor` in the pipeline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<MonitorParams>,
}

fn default_schema_version() -> u32 {
    crate::SCHEMA_VERSION
}
fn default_pipeline() -> Vec<Stage> {
    vec![Stage::Train]
}

/// Where data comes from: `builtin:<name>`, `file:<path>` (a path on the worker's disk) or
/// `bucket:<name>` (the `lathe-datasets` object store).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "String", into = "String")]
#[schemars(with = "String")]
pub enum DataSource {
    Builtin(String),
    File(String),
    Bucket(String),
}

impl TryFrom<String> for DataSource {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let (scheme, rest) = s.split_once(':').ok_or_else(|| {
            format!("`{s}` has no scheme: write builtin:<name>, file:<path> or bucket:<name>")
        })?;
        if rest.is_empty() {
            return Err(format!("`{s}` names nothing after `{scheme}:`"));
        }
        match scheme {
            "builtin" => Ok(DataSource::Builtin(rest.to_string())),
            "file" => Ok(DataSource::File(rest.to_string())),
            "bucket" => Ok(DataSource::Bucket(rest.to_string())),
            other => Err(format!(
                "unknown scheme `{other}:` (expected builtin:, file: or bucket:)"
            )),
        }
    }
}

impl From<DataSource> for String {
    fn from(d: DataSource) -> String {
        d.to_string()
    }
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Builtin(n) => write!(f, "builtin:{n}"),
            DataSource::File(p) => write!(f, "file:{p}"),
            DataSource::Bucket(n) => write!(f, "bucket:{n}"),
        }
    }
}

/// The file format of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// A CSV file with a header; the label column is named by `label_column`.
    Csv,
    /// The MNIST IDX format: `source` holds the images, `labels` the labels.
    Idx,
}

/// The data a job trains on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// `builtin:digits`, `file:<path>` or `bucket:<name>`.
    pub source: DataSource,
    /// File format; CSV unless said otherwise (built-ins know their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DatasetFormat>,
    /// The CSV column holding the class label (any position, any name).
    #[serde(default = "default_label_column")]
    pub label_column: String,
    /// The labels file, for IDX data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<DataSource>,
    /// A separate test set; without it `test_fraction` of the data is held out by seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<TestSetSpec>,
    /// Share of the training part held out for validation (early stopping, searches).
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Share of the data held out for testing when no test set is given.
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
}

fn default_label_column() -> String {
    "label".into()
}
fn default_validation_fraction() -> f64 {
    0.1
}
fn default_test_fraction() -> f64 {
    0.2
}

/// A test set given as its own file(s), in the dataset's format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestSetSpec {
    pub source: DataSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<DataSource>,
}

/// The model family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// A multi-layer perceptron classifier with ReLU between layers.
    #[default]
    Mlp,
}

/// The model's shape, or where to import it from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default)]
    pub kind: ModelKind,
    /// Widths of the hidden layers; input and output widths come from the data.
    #[serde(default = "default_hidden")]
    pub hidden: Vec<u32>,
    /// A safetensors file with the state dict of a PyTorch `nn.Sequential` of `Linear`/`ReLU`,
    /// to start a pipeline without `train` from a model trained elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<DataSource>,
}

fn default_hidden() -> Vec<u32> {
    vec![256, 128]
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec {
            kind: ModelKind::Mlp,
            hidden: default_hidden(),
            source: None,
        }
    }
}

/// Mini-batch Adam training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// Adam's L2 weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Seeds the split, the initial weights and the batch order: the same seed, the same model.
    #[serde(default)]
    pub seed: u64,
    /// Stop after this many epochs without a better validation accuracy (`null`: never).
    #[serde(default = "default_patience")]
    pub patience: Option<u32>,
}

fn default_epochs() -> u32 {
    60
}
fn default_batch_size() -> u32 {
    64
}
fn default_learning_rate() -> f64 {
    1e-3
}
fn default_patience() -> Option<u32> {
    Some(15)
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            epochs: default_epochs(),
            batch_size: default_batch_size(),
            learning_rate: default_learning_rate(),
            weight_decay: 0.0,
            seed: 0,
            patience: default_patience(),
        }
    }
}

/// Knowledge distillation into a smaller student (Hinton et al., 2015).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DistillParams {
    /// The student's hidden widths; absent: the smallest width inside the accuracy budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student_hidden: Option<Vec<u32>>,
    /// Softening temperature T (> 0).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Weight α of the soft-target term, in [0, 1].
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Student training epochs (default 300: on digits distillation beat training from
    /// scratch at 300 epochs and lost to it at 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u32>,
}

/// Student epochs when `distill.epochs` is not given.
pub const DEFAULT_DISTILL_EPOCHS: u32 = 300;

fn default_temperature() -> f64 {
    4.0
}
fn default_alpha() -> f64 {
    0.7
}

/// How weights are scored for pruning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneMethod {
    /// |w|.
    Magnitude,
    /// First-order Taylor saliency |∂L/∂w · w| averaged over training batches.
    Taylor,
}

/// What is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneStructure {
    /// Individual weights.
    Unstructured,
    /// Whole hidden neurons (the dense model itself shrinks).
    Structured,
}

/// Whether sparsity is ranked over all layers or within each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneScope {
    Global,
    Layer,
}

/// Pruning parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneParams {
    #[serde(default = "default_prune_method")]
    pub method: PruneMethod,
    /// Fraction of weights removed, in [0, 1), or "auto".
    #[serde(default = "default_target_sparsity")]
    pub target_sparsity: AutoOr<f64>,
    #[serde(default = "default_structure")]
    pub structure: PruneStructure,
    #[serde(default = "default_scope")]
    pub scope: PruneScope,
    /// Steps of the gradual schedule, each followed by fine-tuning with the mask held.
    #[serde(default = "default_prune_steps")]
    pub steps: u32,
    /// Fine-tuning epochs after each step.
    #[serde(default = "default_finetune_epochs")]
    pub finetune_epochs: u32,
}

fn default_prune_method() -> PruneMethod {
    PruneMethod::Taylor
}
fn default_target_sparsity() -> AutoOr<f64> {
    AutoOr::Value(0.9)
}
fn default_structure() -> PruneStructure {
    PruneStructure::Unstructured
}
fn default_scope() -> PruneScope {
    PruneScope::Global
}
/// Eight steps of five epochs: on the digits MLP at 95 % sparsity four steps lost 0.83
/// points and eight gained 0.28 (`just bench`), for about a second more of fine-tuning.
fn default_prune_steps() -> u32 {
    8
}
fn default_finetune_epochs() -> u32 {
    5
}

/// Scale granularity of a quantized tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    PerTensor,
    PerChannel,
    /// Blocks of `group_size` weights along the input dimension.
    Grouped,
}

/// How the served int8 model quantizes each layer's input activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Activations {
    /// Over the range calibrated on the training sample, stored in the artifact (static).
    Static,
    /// Over each request row's own range (dynamic).
    Dynamic,
}

/// How activation ranges are calibrated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Calibration {
    MinMax,
    Percentile,
}

/// Post-training quantization parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuantizeParams {
    /// 8 or 4, or "auto": the fewest bits, then the coarsest granularity, inside the
    /// accuracy budget.
    #[serde(default = "default_bits")]
    pub bits: AutoOr<u32>,
    /// Omitted: `per_channel`, or searched (per tensor, per channel, grouped) when `bits`
    /// is "auto"; given with "auto" bits, only the bits are searched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granularity: Option<Granularity>,
    /// Weights per scale for `grouped` (and for the grouped candidate of "auto").
    #[serde(default = "default_group_size")]
    pub group_size: u32,
    /// Symmetric (no zero point) or asymmetric.
    #[serde(default = "default_true")]
    pub symmetric: bool,
    #[serde(default = "default_calibration")]
    pub calibration: Calibration,
    /// Whether the served model quantizes activations over the calibrated ranges (static)
    /// or over each request row's own range (dynamic).
    #[serde(default = "default_activations")]
    pub activations: Activations,
    /// Percentile for `percentile` calibration, in (50, 100].
    #[serde(default = "default_percentile")]
    pub percentile: f64,
    /// Train rows sampled for calibration.
    #[serde(default = "default_calibration_rows")]
    pub calibration_rows: u32,
}

fn default_bits() -> AutoOr<u32> {
    AutoOr::Value(8)
}
fn default_activations() -> Activations {
    Activations::Static
}
fn default_group_size() -> u32 {
    32
}
fn default_true() -> bool {
    true
}
fn default_calibration() -> Calibration {
    Calibration::Percentile
}
fn default_percentile() -> f64 {
    99.99
}
fn default_calibration_rows() -> u32 {
    512
}

/// The accuracy compression may cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Largest accepted drop in accuracy against the trained model, as a fraction (0.005 = 0.5 points).
    #[serde(default = "default_max_drop")]
    pub max_accuracy_drop: f64,
}

fn default_max_drop() -> f64 {
    0.005
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            max_accuracy_drop: default_max_drop(),
        }
    }
}

/// How a new version takes traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeployStrategy {
    /// The new version becomes active at once.
    Replace,
    /// The new version gets `canary_percent` of the traffic until the monitor decides.
    Canary,
}

/// Deployment target and gates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployParams {
    /// The model name requests are sent to (`lathe.infer.<model>`).
    pub model: ModelName,
    #[serde(default = "default_strategy")]
    pub strategy: DeployStrategy,
    /// Share of traffic for a canary, in (0, 100).
    #[serde(default = "default_canary_percent")]
    pub canary_percent: f64,
    /// Gate: the lowest test accuracy accepted, in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_accuracy: Option<f64>,
    /// Gate: the largest drop against the trained model (default: the job's budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_accuracy_drop: Option<f64>,
    /// Gate: p99 latency of one row on a short local benchmark, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_latency_ms: Option<f64>,
}

fn default_strategy() -> DeployStrategy {
    DeployStrategy::Replace
}
fn default_canary_percent() -> f64 {
    10.0
}

/// Monitoring policy attached to the deployed model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MonitorParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_latency_ms: Option<f64>,
    /// Largest error rate, as a fraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// Lowest accuracy from feedback labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_accuracy: Option<f64>,
    /// PSI above which a feature has drifted.
    #[serde(default = "default_drift_psi")]
    pub drift_psi: f64,
    /// Rolling window, seconds.
    #[serde(default = "default_window")]
    pub window_secs: u32,
    /// How long a canary must stay healthy before it is promoted, seconds.
    #[serde(default = "default_canary_window")]
    pub canary_window_secs: u32,
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
    #[serde(default)]
    pub retrain_on_drift: bool,
    /// Held-out rows sent through the live endpoint by the smoke test.
    #[serde(default = "default_smoke_rows")]
    pub smoke_rows: u32,
}

impl Default for MonitorParams {
    /// The policy `"monitor": {}` gives.
    fn default() -> Self {
        MonitorParams {
            p99_latency_ms: None,
            max_error_rate: None,
            min_accuracy: None,
            drift_psi: default_drift_psi(),
            window_secs: default_window(),
            canary_window_secs: default_canary_window(),
            auto_rollback: default_true(),
            retrain_on_drift: false,
            smoke_rows: default_smoke_rows(),
        }
    }
}

fn default_drift_psi() -> f64 {
    0.2
}
fn default_window() -> u32 {
    60
}
fn default_canary_window() -> u32 {
    300
}
fn default_smoke_rows() -> u32 {
    50
}

impl JobSpec {
    /// Parses a spec from JSON or MessagePack (`format`), then validates it. Every error names
    /// its field; a payload that does not decode yields one error, a decoded spec every
    /// invalid field at once.
    pub fn parse(bytes: &[u8], format: Format) -> Result<JobSpec, Vec<FieldError>> {
        let spec: JobSpec = codec::decode(bytes, format).map_err(|e| vec![e.into_field_error()])?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses a spec written in TOML (the CLI accepts `spec.toml`), then validates it.
    pub fn parse_toml(text: &str) -> Result<JobSpec, Vec<FieldError>> {
        let de = toml::Deserializer::parse(text).map_err(|e| {
            vec![FieldError::new(
                ".",
                format!("invalid TOML: {}", e.message()),
            )]
        })?;
        let spec: JobSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            vec![FieldError::new(path, e.into_inner().message().to_string())]
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// The index of a stage in the pipeline.
    pub fn step_of(&self, stage: Stage) -> Option<u32> {
        self.pipeline
            .iter()
            .position(|s| *s == stage)
            .map(|p| p as u32)
    }

    /// Checks every rule that the types alone cannot, collecting every violation.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errs = Vec::new();
        let mut bad = |field: &str, reason: String| errs.push(FieldError::new(field, reason));

        if self.schema_version > crate::SCHEMA_VERSION {
            bad(
                "schema_version",
                format!(
                    "version {} is newer than this build supports ({})",
                    self.schema_version,
                    crate::SCHEMA_VERSION
                ),
            );
        } else if self.schema_version == 0 {
            bad("schema_version", "must be at least 1".into());
        }
        if self.name.trim().is_empty() {
            bad("name", "must not be empty".into());
        } else if self.name.len() > 128 {
            bad(
                "name",
                format!("must be at most 128 characters, got {}", self.name.len()),
            );
        }

        // Dataset.
        let d = &self.dataset;
        if !(0.0..=0.5).contains(&d.validation_fraction) {
            bad(
                "dataset.validation_fraction",
                format!("must be in [0, 0.5], got {}", d.validation_fraction),
            );
        }
        // The fraction is used only when the test rows are split off the data; where it is
        // unused it must still be a fraction, so that no NaN rides along in a stored spec.
        if d.test.is_none() && !matches!(d.source, DataSource::Builtin(_)) {
            if !(d.test_fraction > 0.0 && d.test_fraction <= 0.5) {
                bad(
                    "dataset.test_fraction",
                    format!("must be in (0, 0.5], got {}", d.test_fraction),
                );
            }
        } else if !(0.0..=0.5).contains(&d.test_fraction) {
            bad(
                "dataset.test_fraction",
                format!("must be in [0, 0.5], got {}", d.test_fraction),
            );
        }
        if let DataSource::Builtin(name) = &d.source {
            if name != "digits" {
                bad(
                    "dataset.source",
                    format!("unknown built-in dataset `{name}` (built-ins: digits)"),
                );
            }
            if d.format.is_some() {
                bad(
                    "dataset.format",
                    "a built-in dataset has its own format; remove it".into(),
                );
            }
            if d.test.is_some() {
                bad(
                    "dataset.test",
                    "a built-in dataset comes with its own test split; remove it".into(),
                );
            }
        }
        let idx = d.format == Some(DatasetFormat::Idx);
        match (&d.labels, idx) {
            (None, true) => bad("dataset.labels", "required for IDX data (the labels file)".into()),
            (Some(_), false) => bad(
                "dataset.labels",
                "only IDX data has a separate labels file; for CSV name the column with label_column"
                    .into(),
            ),
            _ => {}
        }
        if let Some(t) = &d.test {
            match (&t.labels, idx) {
                (None, true) => bad("dataset.test.labels", "required for IDX data".into()),
                (Some(_), false) => bad(
                    "dataset.test.labels",
                    "only IDX data has a labels file".into(),
                ),
                _ => {}
            }
            if matches!(t.source, DataSource::Builtin(_)) {
                bad(
                    "dataset.test.source",
                    "a test set cannot be a built-in".into(),
                );
            }
        }
        if d.label_column.trim().is_empty() {
            bad("dataset.label_column", "must not be empty".into());
        }

        // Model.
        if self.model.hidden.len() > 16 {
            bad(
                "model.hidden",
                format!("at most 16 hidden layers, got {}", self.model.hidden.len()),
            );
        }
        for (i, w) in self.model.hidden.iter().enumerate() {
            if *w == 0 || *w > 65_536 {
                bad(
                    &format!("model.hidden[{i}]"),
                    format!("width must be in 1..=65536, got {w}"),
                );
            }
        }
        if matches!(self.model.source, Some(DataSource::Builtin(_))) {
            bad(
                "model.source",
                "a model is imported from file: or bucket:, not builtin:".into(),
            );
        }

        // Training.
        let t = &self.train;
        if t.epochs == 0 || t.epochs > 100_000 {
            bad(
                "train.epochs",
                format!("must be in 1..=100000, got {}", t.epochs),
            );
        }
        if t.batch_size == 0 || t.batch_size > 1_000_000 {
            bad(
                "train.batch_size",
                format!("must be in 1..=1000000, got {}", t.batch_size),
            );
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0 && t.learning_rate <= 10.0) {
            bad(
                "train.learning_rate",
                format!("must be in (0, 10], got {}", t.learning_rate),
            );
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            bad(
                "train.weight_decay",
                format!("must be a finite number ≥ 0, got {}", t.weight_decay),
            );
        }
        if t.patience == Some(0) {
            bad(
                "train.patience",
                "must be at least 1 (or null for no early stopping)".into(),
            );
        }

        // Pipeline.
        if self.pipeline.is_empty() {
            bad("pipeline", "must name at least one stage".into());
        }
        for (i, pair) in self.pipeline.windows(2).enumerate() {
            if pair[1] <= pair[0] {
                bad(
                    &format!("pipeline[{}]", i + 1),
                    format!(
                        "`{}` cannot follow `{}`: stages run in the order train, distill, prune, quantize, deploy, monitor, each once",
                        pair[1], pair[0]
                    ),
                );
            }
        }
        for (i, s) in self.pipeline.iter().enumerate() {
            if !s.is_available() {
                bad(
                    &format!("pipeline[{i}]"),
                    format!("stage `{s}` has no service in this release"),
                );
            }
        }
        let has = |s: Stage| self.pipeline.contains(&s);
        match (has(Stage::Train), &self.model.source) {
            (true, Some(_)) => bad(
                "model.source",
                "a pipeline with `train` trains its own model: remove model.source or remove train"
                    .into(),
            ),
            (false, None) if !self.pipeline.is_empty() => bad(
                "pipeline",
                "without `train` the job needs a model to start from: set model.source".into(),
            ),
            _ => {}
        }
        if has(Stage::Monitor) && !has(Stage::Deploy) {
            bad(
                "pipeline",
                "`monitor` watches a deployed model: it needs `deploy` before it".into(),
            );
        }
        let unused = |name: &str, stage: Stage, present: bool, errs: &mut Vec<FieldError>| {
            if present && !has(stage) {
                errs.push(FieldError::new(
                    name,
                    format!("parameters given but `{stage}` is not in the pipeline (they would be ignored)"),
                ));
            }
        };
        unused("distill", Stage::Distill, self.distill.is_some(), &mut errs);
        unused("prune", Stage::Prune, self.prune.is_some(), &mut errs);
        unused(
            "quantize",
            Stage::Quantize,
            self.quantize.is_some(),
            &mut errs,
        );
        unused("deploy", Stage::Deploy, self.deploy.is_some(), &mut errs);
        unused("monitor", Stage::Monitor, self.monitor.is_some(), &mut errs);
        let mut bad = |field: &str, reason: String| errs.push(FieldError::new(field, reason));
        if has(Stage::Deploy) && self.deploy.is_none() {
            bad(
                "deploy",
                "required when the pipeline has `deploy` (at least the model name)".into(),
            );
        }

        // Budget.
        let drop = self.budget.max_accuracy_drop;
        if !(drop.is_finite() && (0.0..=1.0).contains(&drop)) {
            bad(
                "budget.max_accuracy_drop",
                format!("must be a fraction in [0, 1], got {drop}"),
            );
        }

        // Stage parameters.
        if let Some(p) = &self.distill {
            if !(p.temperature.is_finite() && p.temperature > 0.0) {
                bad(
                    "distill.temperature",
                    format!("must be > 0, got {}", p.temperature),
                );
            }
            if !(p.alpha.is_finite() && (0.0..=1.0).contains(&p.alpha)) {
                bad(
                    "distill.alpha",
                    format!("must be in [0, 1], got {}", p.alpha),
                );
            }
            if let Some(h) = &p.student_hidden {
                if h.len() > 16 {
                    bad(
                        "distill.student_hidden",
                        format!("at most 16 hidden layers, got {}", h.len()),
                    );
                }
                for (i, w) in h.iter().enumerate() {
                    if *w == 0 || *w > 65_536 {
                        bad(
                            &format!("distill.student_hidden[{i}]"),
                            format!("width must be in 1..=65536, got {w}"),
                        );
                    }
                }
            }
            if let Some(e) = p.epochs
                && !(1..=100_000).contains(&e)
            {
                bad("distill.epochs", format!("must be in 1..=100000, got {e}"));
            }
        }
        if let Some(p) = &self.prune {
            if let AutoOr::Value(s) = p.target_sparsity
                && !(s.is_finite() && (0.0..1.0).contains(&s))
            {
                bad(
                    "prune.target_sparsity",
                    format!("must be in [0, 1) or \"auto\", got {s}"),
                );
            }
            if p.steps == 0 || p.steps > 100 {
                bad(
                    "prune.steps",
                    format!("must be in 1..=100, got {}", p.steps),
                );
            }
            if p.finetune_epochs > 100_000 {
                bad(
                    "prune.finetune_epochs",
                    format!("must be in 0..=100000, got {}", p.finetune_epochs),
                );
            }
        }
        if let Some(p) = &self.quantize {
            if let AutoOr::Value(b) = p.bits
                && b != 8
                && b != 4
            {
                bad(
                    "quantize.bits",
                    format!("{b} bits are not supported (8, 4 or \"auto\")"),
                );
            }
            if p.group_size == 0 {
                bad("quantize.group_size", "must be at least 1".into());
            }
            if !(p.percentile > 50.0 && p.percentile <= 100.0) {
                bad(
                    "quantize.percentile",
                    format!("must be in (50, 100], got {}", p.percentile),
                );
            }
            if p.calibration_rows == 0 {
                bad("quantize.calibration_rows", "must be at least 1".into());
            }
        }
        if let Some(p) = &self.deploy {
            if p.strategy == DeployStrategy::Canary
                && !(p.canary_percent > 0.0 && p.canary_percent < 100.0)
            {
                bad(
                    "deploy.canary_percent",
                    format!("must be in (0, 100) for a canary, got {}", p.canary_percent),
                );
            } else if !(0.0..=100.0).contains(&p.canary_percent) {
                bad(
                    "deploy.canary_percent",
                    format!("must be in [0, 100], got {}", p.canary_percent),
                );
            }
            if let Some(a) = p.min_accuracy
                && !(0.0..=1.0).contains(&a)
            {
                bad(
                    "deploy.min_accuracy",
                    format!("must be a fraction in [0, 1], got {a}"),
                );
            }
            if let Some(a) = p.max_accuracy_drop
                && !(0.0..=1.0).contains(&a)
            {
                bad(
                    "deploy.max_accuracy_drop",
                    format!("must be a fraction in [0, 1], got {a}"),
                );
            }
            if let Some(l) = p.p99_latency_ms
                && !(l.is_finite() && l > 0.0)
            {
                bad("deploy.p99_latency_ms", format!("must be > 0, got {l}"));
            }
        }
        if let Some(p) = &self.monitor {
            if !(p.drift_psi.is_finite() && p.drift_psi > 0.0) {
                bad(
                    "monitor.drift_psi",
                    format!("must be > 0, got {}", p.drift_psi),
                );
            }
            if p.window_secs == 0 {
                bad("monitor.window_secs", "must be at least 1".into());
            }
            if let Some(r) = p.max_error_rate
                && !(0.0..=1.0).contains(&r)
            {
                bad(
                    "monitor.max_error_rate",
                    format!("must be a fraction in [0, 1], got {r}"),
                );
            }
            if let Some(l) = p.p99_latency_ms
                && !(l.is_finite() && l > 0.0)
            {
                bad("monitor.p99_latency_ms", format!("must be > 0, got {l}"));
            }
            if let Some(a) = p.min_accuracy
                && !(0.0..=1.0).contains(&a)
            {
                bad(
                    "monitor.min_accuracy",
                    format!("must be a fraction in [0, 1], got {a}"),
                );
            }
        }

        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }
}
