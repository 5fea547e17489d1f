//! What a model is: [`ModelSpec`], read from TOML or JSON and validated once.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The largest feature width a spec may declare.
pub const MAX_INPUTS: usize = 1 << 20;
/// The largest width of one hidden layer.
pub const MAX_HIDDEN_WIDTH: usize = 1 << 16;
/// The largest number of hidden layers.
pub const MAX_HIDDEN_LAYERS: usize = 16;
/// The largest number of parameters a spec may describe (512 Mi floats,
/// 2 GiB of f32): anything bigger is not a model for per-hospital training.
pub const MAX_PARAMETERS: usize = 1 << 29;

/// The model families confer trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// Binary logistic regression: one linear layer to a logit.
    LogisticRegression,
    /// Multi-layer perceptron for binary classification: `hidden` linear
    /// layers with `activation` and `dropout`, then a linear layer to a logit.
    Mlp,
    /// Cox proportional hazards: a linear risk score without intercept
    /// (the baseline hazard absorbs it), fitted by partial likelihood.
    Cox,
}

impl Architecture {
    /// The name used in TOML and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::LogisticRegression => "logistic_regression",
            Architecture::Mlp => "mlp",
            Architecture::Cox => "cox",
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Hidden-layer non-linearity of an MLP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(0, x).
    #[default]
    Relu,
    /// Hyperbolic tangent.
    Tanh,
    /// Gaussian error linear unit (exact, erf form).
    Gelu,
}

/// A model's architecture and sizes, as a study declares it.
///
/// ```toml
/// architecture = "mlp"      # "logistic_regression" | "mlp" | "cox"
/// inputs = 16               # features per row
/// hidden = [64, 32]         # mlp only: widths of the hidden layers
/// activation = "relu"       # mlp only: "relu" (default) | "tanh" | "gelu"
/// dropout = 0.1             # mlp only: dropout after each hidden layer, in [0, 1)
/// ```
///
/// Unknown fields are refused, so a typo cannot silently fall back to a
/// default. Build specs from text with [`ModelSpec::from_toml_str`] or
/// [`ModelSpec::from_json_str`], which validate; a spec built in code is
/// validated by [`crate::Model::new`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The model family.
    pub architecture: Architecture,
    /// Features per row.
    pub inputs: usize,
    /// Hidden layer widths (MLP only, at least one layer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<usize>,
    /// Hidden-layer activation (MLP only; ReLU when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<Activation>,
    /// Dropout probability after each hidden activation (MLP only; 0 when
    /// absent). Active only during local training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
}

impl ModelSpec {
    /// Logistic regression on `inputs` features.
    pub fn logistic_regression(inputs: usize) -> Self {
        ModelSpec {
            architecture: Architecture::LogisticRegression,
            inputs,
            hidden: Vec::new(),
            activation: None,
            dropout: None,
        }
    }

    /// An MLP with the given hidden widths, ReLU and no dropout.
    pub fn mlp(inputs: usize, hidden: impl Into<Vec<usize>>) -> Self {
        ModelSpec {
            architecture: Architecture::Mlp,
            inputs,
            hidden: hidden.into(),
            activation: None,
            dropout: None,
        }
    }

    /// A Cox proportional-hazards model on `inputs` covariates.
    pub fn cox(inputs: usize) -> Self {
        ModelSpec {
            architecture: Architecture::Cox,
            inputs,
            hidden: Vec::new(),
            activation: None,
            dropout: None,
        }
    }

    /// Sets the MLP activation.
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = Some(activation);
        self
    }

    /// Sets the MLP dropout probability.
    pub fn with_dropout(mut self, dropout: f64) -> Self {
        self.dropout = Some(dropout);
        self
    }

    /// Parses and validates a spec from TOML.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let spec: ModelSpec = toml::from_str(text).map_err(|e| Error::ParseSpec {
            format: "TOML",
            message: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses and validates a spec from JSON.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let spec: ModelSpec = serde_json::from_str(text).map_err(|e| Error::ParseSpec {
            format: "JSON",
            message: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// The spec as TOML.
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Internal(format!("spec to TOML: {e}")))
    }

    /// The spec as JSON.
    pub fn to_json_string(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::Internal(format!("spec to JSON: {e}")))
    }

    /// The activation in effect (ReLU unless set).
    pub fn activation(&self) -> Activation {
        self.activation.unwrap_or_default()
    }

    /// The dropout probability in effect (0 unless set).
    pub fn dropout(&self) -> f64 {
        self.dropout.unwrap_or(0.0)
    }

    /// Whether the model predicts a binary label (logistic regression, MLP)
    /// rather than a survival risk score (Cox).
    pub fn is_classifier(&self) -> bool {
        self.architecture != Architecture::Cox
    }

    /// The (out, in) shape of every linear layer, input side first.
    pub fn layer_shapes(&self) -> Vec<(usize, usize)> {
        let mut shapes = Vec::with_capacity(self.hidden.len() + 1);
        let mut width = self.inputs;
        for &h in &self.hidden {
            shapes.push((h, width));
            width = h;
        }
        shapes.push((1, width));
        shapes
    }

    /// Whether the linear layers carry a bias (all but Cox's).
    pub fn has_bias(&self) -> bool {
        self.architecture != Architecture::Cox
    }

    /// The model's initial parameters for `seed`, as one flat vector in
    /// the layout of `Model::parameters`: each layer's weights then its
    /// bias, drawn from `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` (PyTorch's
    /// default for `nn.Linear`) by a ChaCha8 stream seeded with `seed`, in
    /// that order; Cox starts at zero. Pure Rust: the same values on every
    /// node and at the coordinator, with or without libtorch.
    pub fn initial_parameters(&self, seed: u64) -> Result<Vec<f32>> {
        use rand::{Rng, SeedableRng};
        self.validate()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let zero = self.architecture == Architecture::Cox;
        let mut out = Vec::with_capacity(self.num_parameters());
        for (fan_out, fan_in) in self.layer_shapes() {
            let bound = 1.0 / (fan_in as f64).sqrt();
            let n = fan_out * fan_in + if self.has_bias() { fan_out } else { 0 };
            for _ in 0..n {
                out.push(if zero {
                    0.0
                } else {
                    rng.random_range(-bound..bound) as f32
                });
            }
        }
        Ok(out)
    }

    /// The number of parameters (weights and biases) the spec describes.
    /// Saturates rather than overflows; [`ModelSpec::validate`] bounds it.
    pub fn num_parameters(&self) -> usize {
        let bias = usize::from(self.has_bias());
        self.layer_shapes().iter().fold(0usize, |acc, &(o, i)| {
            acc.saturating_add(o.saturating_mul(i).saturating_add(o * bias))
        })
    }

    /// Checks every field; the error names the field and what to change.
    pub fn validate(&self) -> Result<()> {
        if self.inputs == 0 {
            return Err(Error::spec(
                "inputs",
                "must be at least 1 (the number of features per row)",
            ));
        }
        if self.inputs > MAX_INPUTS {
            return Err(Error::spec(
                "inputs",
                format!(
                    "= {} exceeds the limit of {MAX_INPUTS} features",
                    self.inputs
                ),
            ));
        }
        let mlp_only = |field: &'static str| {
            Error::spec(
                field,
                format!(
                    "applies only to architecture = \"mlp\", not \"{}\": remove it",
                    self.architecture
                ),
            )
        };
        match self.architecture {
            Architecture::Mlp => {
                if self.hidden.is_empty() {
                    return Err(Error::spec(
                        "hidden",
                        "must list at least one hidden layer width for an mlp, e.g. hidden = [64, 32] \
                         (for no hidden layer use architecture = \"logistic_regression\")",
                    ));
                }
                if self.hidden.len() > MAX_HIDDEN_LAYERS {
                    return Err(Error::spec(
                        "hidden",
                        format!(
                            "has {} layers; at most {MAX_HIDDEN_LAYERS} are supported",
                            self.hidden.len()
                        ),
                    ));
                }
                if let Some((i, &w)) = self
                    .hidden
                    .iter()
                    .enumerate()
                    .find(|&(_, &w)| w == 0 || w > MAX_HIDDEN_WIDTH)
                {
                    return Err(Error::spec(
                        "hidden",
                        format!(
                            "[{i}] = {w}: every width must be between 1 and {MAX_HIDDEN_WIDTH}"
                        ),
                    ));
                }
                if let Some(p) = self.dropout
                    && !(0.0..1.0).contains(&p)
                {
                    return Err(Error::spec(
                        "dropout",
                        format!("= {p} must be in [0, 1), e.g. dropout = 0.1"),
                    ));
                }
            }
            Architecture::LogisticRegression | Architecture::Cox => {
                if !self.hidden.is_empty() {
                    return Err(mlp_only("hidden"));
                }
                if self.activation.is_some() {
                    return Err(mlp_only("activation"));
                }
                if self.dropout.is_some() {
                    return Err(mlp_only("dropout"));
                }
            }
        }
        let n = self.num_parameters();
        if n > MAX_PARAMETERS {
            return Err(Error::spec(
                "hidden",
                format!(
                    "makes {n} parameters, more than the limit of {MAX_PARAMETERS}: use narrower layers"
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_mlp_from_toml() {
        let spec = ModelSpec::from_toml_str(
            r#"
            architecture = "mlp"
            inputs = 16
            hidden = [64, 32]
            activation = "gelu"
            dropout = 0.1
            "#,
        )
        .unwrap();
        assert_eq!(spec.architecture, Architecture::Mlp);
        assert_eq!(spec.hidden, vec![64, 32]);
        assert_eq!(spec.activation(), Activation::Gelu);
        assert_eq!(spec.dropout(), 0.1);
        // 16*64+64 + 64*32+32 + 32*1+1
        assert_eq!(spec.num_parameters(), 1088 + 2080 + 33);
    }

    #[test]
    fn json_round_trips() {
        let spec = ModelSpec::mlp(8, [4]).with_activation(Activation::Tanh);
        let back = ModelSpec::from_json_str(&spec.to_json_string().unwrap()).unwrap();
        assert_eq!(spec, back);
        let spec = ModelSpec::cox(3);
        let back = ModelSpec::from_toml_str(&spec.to_toml_string().unwrap()).unwrap();
        assert_eq!(spec, back);
    }

    #[test]
    fn parameter_counts() {
        assert_eq!(ModelSpec::logistic_regression(13).num_parameters(), 14);
        assert_eq!(ModelSpec::cox(5).num_parameters(), 5);
        assert_eq!(
            ModelSpec::mlp(256, [1024, 768]).num_parameters(),
            256 * 1024 + 1024 + 1024 * 768 + 768 + 768 + 1
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"architecture = "mlp"
                inputs = 4"#,
                "`hidden`",
            ),
            (
                r#"architecture = "mlp"
                inputs = 4
                hidden = [8, 0]"#,
                "hidden",
            ),
            (
                r#"architecture = "mlp"
                inputs = 4
                hidden = [8]
                dropout = 1.0"#,
                "`dropout`",
            ),
            (
                r#"architecture = "logistic_regression"
                inputs = 0"#,
                "`inputs`",
            ),
            (
                r#"architecture = "cox"
                inputs = 3
                dropout = 0.2"#,
                "`dropout`",
            ),
            (
                r#"architecture = "logistic_regression"
                inputs = 3
                hidden = [2]"#,
                "`hidden`",
            ),
        ];
        for (text, field) in cases {
            let err = ModelSpec::from_toml_str(text).unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
    }

    #[test]
    fn unknown_fields_and_values_are_refused() {
        let err = ModelSpec::from_toml_str("architecture = \"mlp\"\ninputs = 4\nhiden = [8]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("hiden"), "{err}");
        let err = ModelSpec::from_toml_str("architecture = \"svm\"\ninputs = 4")
            .unwrap_err()
            .to_string();
        assert!(err.contains("svm"), "{err}");
    }

    #[test]
    fn parameter_limit_is_enforced() {
        let err = ModelSpec::mlp(MAX_INPUTS, [MAX_HIDDEN_WIDTH])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("limit"), "{err}");
    }
}
