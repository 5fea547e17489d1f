//! The crate's error type.

use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when building, training, evaluating or
/// aggregating a model.
///
/// Variants a user (or a study's configuration) can cause say what to change;
/// [`Error::Internal`] means a broken invariant in this crate, i.e. a bug.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of a [`crate::ModelSpec`] is out of range or does not apply.
    #[error("model spec: `{field}` {reason}")]
    InvalidSpec {
        /// The offending field, as written in TOML/JSON.
        field: &'static str,
        /// What is wrong and what to write instead.
        reason: String,
    },
    /// A model spec could not be parsed.
    #[error("model spec is not valid {format}: {message}")]
    ParseSpec {
        /// `"TOML"` or `"JSON"`.
        format: &'static str,
        /// The parser's message (with line and column where it gives them).
        message: String,
    },
    /// A field of a [`crate::LocalConfig`], [`crate::EvalConfig`] or
    /// [`crate::ServerStrategy`] is out of range.
    #[error("{section}: `{field}` {reason}")]
    InvalidConfig {
        /// Which configuration (`"local training"`, `"server strategy"`, ...).
        section: &'static str,
        /// The offending field.
        field: &'static str,
        /// What is wrong and what to write instead.
        reason: String,
    },
    /// A flat parameter or update vector has the wrong length.
    #[error(
        "{what} has {got} values but the model has {expected} parameters: \
         the vector was produced for a different model spec"
    )]
    ParameterWidth {
        /// Which vector (`"parameters"`, `"update sum"`, ...).
        what: &'static str,
        /// The model's number of parameters.
        expected: usize,
        /// The vector's length.
        got: usize,
    },
    /// A dataset is malformed (ragged rows, non-finite values, bad labels).
    #[error("dataset: {0}")]
    InvalidDataset(String),
    /// The dataset's feature width differs from the model's `inputs`.
    #[error(
        "dataset has {data} features per row but the model spec says inputs = {model}: \
         change `inputs` or the feature extraction so that they agree"
    )]
    FeatureWidth {
        /// `inputs` of the model spec.
        model: usize,
        /// Features per row in the dataset.
        data: usize,
    },
    /// The dataset's targets do not suit the model (binary labels for a Cox
    /// model, or survival targets for a classifier).
    #[error("{0}")]
    TargetKind(String),
    /// A server step was asked of invalid aggregates.
    #[error("server step: {0}")]
    InvalidAggregate(String),
    /// Training diverged (a loss or parameter became NaN or infinite).
    #[error("training diverged: {0}; lower the learning rate or clip the features")]
    Diverged(String),
    /// Reading or writing a weights file or its spec sidecar failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The spec sidecar of a weights file could not be parsed.
    #[error("{path}: not a model spec sidecar: {message}")]
    Sidecar {
        /// The sidecar file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A training job (`job.toml`) is invalid; the message names the field
    /// and what to write instead.
    #[error("training job: {0}")]
    InvalidJob(String),
    /// The job's privacy parameters cannot be calibrated.
    #[error("training job privacy: {0}")]
    Privacy(String),
    /// libtorch reported an error.
    #[cfg(feature = "torch")]
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A broken invariant inside this crate.
    #[error("internal error (a bug in confer-models, please report it): {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn spec(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidSpec {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn config(
        section: &'static str,
        field: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidConfig {
            section,
            field,
            reason: reason.into(),
        }
    }
}
