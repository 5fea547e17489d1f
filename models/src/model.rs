//! [`Model`]: a [`ModelSpec`] instantiated on a libtorch device, with its
//! parameters as one flat vector.

use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::spec::{Activation, ModelSpec};

/// One linear layer: `y = x W^T + b`.
#[derive(Debug)]
struct Linear {
    /// `[out, in]`.
    weight: Tensor,
    /// `[out]`, absent for Cox.
    bias: Option<Tensor>,
}

/// A model ready to train, evaluate and exchange parameters.
///
/// # Parameter layout
///
/// [`Model::parameters`] and [`Model::set_parameters`] use one flat `f32`
/// vector, the same on every node and at the coordinator. Linear layers come
/// input side first (the hidden layers of an MLP in order, then the output
/// layer); each layer contributes its weight matrix `[out, in]` in row-major
/// order, then its bias `[out]` (Cox has no bias). Logistic regression on `d`
/// features is therefore `[w_1 .. w_d, b]`, and Cox is `[beta_1 .. beta_d]`.
///
/// In a weights file the same tensors are named `layers.{i}.weight` and
/// `layers.{i}.bias`.
///
/// # Initialisation
///
/// Weights and biases are drawn from `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`,
/// PyTorch's default for `nn.Linear`, using a ChaCha8 stream seeded with the
/// `seed` given to [`Model::new`]: the same spec and seed give the same
/// initial parameters on any device and thread, without touching libtorch's
/// global generator. Cox models start at `beta = 0` (the partial likelihood
/// is concave, so zero is the natural starting point) whatever the seed.
#[derive(Debug)]
pub struct Model {
    spec: ModelSpec,
    vs: VarStore,
    layers: Vec<Linear>,
}

impl Model {
    /// Builds a model on CUDA when available, on CPU otherwise.
    pub fn new(spec: &ModelSpec, seed: u64) -> Result<Self> {
        Self::with_device(spec, seed, Device::cuda_if_available())
    }

    /// Builds a model on the given device.
    pub fn with_device(spec: &ModelSpec, seed: u64, device: Device) -> Result<Self> {
        let initial = spec.initial_parameters(seed)?;
        let vs = VarStore::new(device);
        let root = vs.root();
        let mut values = initial.as_slice();
        let mut take = |n: usize| {
            let (head, rest) = values.split_at(n);
            values = rest;
            head
        };
        let mut layers = Vec::new();
        for (i, (out, inp)) in spec.layer_shapes().into_iter().enumerate() {
            let path = root.sub("layers").sub(i);
            let w = Tensor::f_from_slice(take(out * inp))?.f_view([out as i64, inp as i64])?;
            let weight = path.f_var_copy("weight", &w)?;
            let bias = if spec.has_bias() {
                Some(path.f_var_copy("bias", &Tensor::f_from_slice(take(out))?)?)
            } else {
                None
            };
            layers.push(Linear { weight, bias });
        }
        Ok(Model {
            spec: spec.clone(),
            vs,
            layers,
        })
    }

    /// The spec the model was built from.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Length of the flat parameter vector.
    pub fn num_parameters(&self) -> usize {
        self.spec.num_parameters()
    }

    /// The parameter tensors in flat-vector order.
    pub(crate) fn parameter_tensors(&self) -> Vec<&Tensor> {
        let mut out = Vec::with_capacity(2 * self.layers.len());
        for layer in &self.layers {
            out.push(&layer.weight);
            if let Some(b) = &layer.bias {
                out.push(b);
            }
        }
        out
    }

    /// The parameters as one flat vector, in the order documented on [`Model`].
    pub fn parameters(&self) -> Result<Vec<f32>> {
        let flat: Vec<Tensor> = self
            .parameter_tensors()
            .into_iter()
            .map(|t| t.f_detach()?.f_reshape([-1]))
            .collect::<Result<_, _>>()?;
        let all = Tensor::f_cat(&flat, 0)?
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?;
        let out = Vec::<f32>::try_from(&all)?;
        if out.len() != self.num_parameters() {
            return Err(Error::Internal(format!(
                "parameter tensors hold {} values, spec says {}",
                out.len(),
                self.num_parameters()
            )));
        }
        Ok(out)
    }

    /// Overwrites every parameter from a flat vector (same order as
    /// [`Model::parameters`]).
    pub fn set_parameters(&mut self, values: &[f32]) -> Result<()> {
        if values.len() != self.num_parameters() {
            return Err(Error::ParameterWidth {
                what: "parameters",
                expected: self.num_parameters(),
                got: values.len(),
            });
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidAggregate(format!(
                "parameter {i} is {}; refusing to load a non-finite model",
                values[i]
            )));
        }
        let device = self.device();
        let all = Tensor::f_from_slice(values)?.f_to_device(device)?;
        let mut offset = 0i64;
        tch::no_grad(|| -> Result<()> {
            for t in self.parameter_tensors() {
                let n = t.numel() as i64;
                let chunk = all.f_narrow(0, offset, n)?.f_view(t.size().as_slice())?;
                t.shallow_clone().f_copy_(&chunk)?;
                offset += n;
            }
            Ok(())
        })
    }

    /// The model's output for a `[n, inputs]` float tensor on the model's
    /// device: logits for classifiers, log relative hazards (risk scores) for
    /// Cox, shape `[n]`. Dropout is applied only when `train` is true.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.layers.len() - 1;
        let mut h = x.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let wt = layer.weight.f_tr()?;
            h = match &layer.bias {
                Some(b) => b.f_addmm(&h, &wt)?,
                None => h.f_matmul(&wt)?,
            };
            if i < last {
                h = match self.spec.activation() {
                    Activation::Relu => h.f_relu()?,
                    Activation::Tanh => h.f_tanh()?,
                    Activation::Gelu => h.f_gelu("none")?,
                };
                let p = self.spec.dropout();
                if train && p > 0.0 {
                    h = h.f_dropout(p, true)?;
                }
            }
        }
        Ok(h.f_squeeze_dim(1)?)
    }

    /// Predictions for row-major features: probabilities of the positive
    /// class for classifiers, risk scores (log relative hazard) for Cox.
    pub fn predict(&self, features: &[f32]) -> Result<Vec<f32>> {
        let width = self.spec.inputs;
        if !features.len().is_multiple_of(width) {
            return Err(Error::InvalidDataset(format!(
                "{} feature values do not divide into rows of inputs = {width}",
                features.len()
            )));
        }
        let rows = (features.len() / width) as i64;
        let x = Tensor::f_from_slice(features)?
            .f_view([rows, width as i64])?
            .f_to_device(self.device())?;
        let out = tch::no_grad(|| self.forward(&x, false))?;
        let out = if self.spec.is_classifier() {
            out.f_sigmoid()?
        } else {
            out
        };
        Ok(Vec::<f32>::try_from(&out.f_to_device(Device::Cpu)?)?)
    }

    /// Writes the weights to `path` (safetensors; the name must end in
    /// `.safetensors`) and the spec beside it as JSON, at
    /// [`spec_sidecar_path`]. Both are written to temporary names first and
    /// renamed, so a crash never leaves a half-written pair.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        check_weights_path(path)?;
        let sidecar = spec_sidecar_path(path);
        let tmp_weights = with_suffix(path, ".tmp.safetensors");
        let tmp_sidecar = with_suffix(&sidecar, ".tmp");
        let json = self.spec.to_json_string()?;
        std::fs::write(&tmp_sidecar, json).map_err(|source| Error::Io {
            path: tmp_sidecar.clone(),
            source,
        })?;
        self.vs.save(&tmp_weights)?;
        for (from, to) in [(&tmp_weights, path), (&tmp_sidecar, sidecar.as_path())] {
            std::fs::rename(from, to).map_err(|source| Error::Io {
                path: to.to_path_buf(),
                source,
            })?;
        }
        Ok(())
    }

    /// Reads a model written by [`Model::save`] onto `device`.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        check_weights_path(path)?;
        let sidecar = spec_sidecar_path(path);
        let text = std::fs::read_to_string(&sidecar).map_err(|source| Error::Io {
            path: sidecar.clone(),
            source,
        })?;
        let spec = ModelSpec::from_json_str(&text).map_err(|e| Error::Sidecar {
            path: sidecar.clone(),
            message: e.to_string(),
        })?;
        let mut model = Model::with_device(&spec, 0, device)?;
        model.load_weights(path)?;
        Ok(model)
    }

    /// Overwrites the parameters from a safetensors file with this model's
    /// tensor names and shapes (extra tensors in the file are ignored).
    pub fn load_weights(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        check_weights_path(path)?;
        if !path.is_file() {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        self.vs.load(path)?;
        Ok(())
    }
}

/// Where [`Model::save`] puts the spec of `weights`: `model.safetensors`
/// gets `model.spec.json`.
pub fn spec_sidecar_path(weights: &Path) -> PathBuf {
    let stem = weights
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    weights.with_file_name(format!("{stem}.spec.json"))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn check_weights_path(path: &Path) -> Result<()> {
    if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        Ok(())
    } else {
        Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "weights files are safetensors: give the path a .safetensors extension",
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_parameters_follow_the_documented_layout() {
        let spec = ModelSpec::mlp(3, [2]);
        let mut m = Model::with_device(&spec, 7, Device::Cpu).unwrap();
        let n = m.num_parameters();
        assert_eq!(n, 3 * 2 + 2 + 2 + 1);
        let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
        m.set_parameters(&values).unwrap();
        assert_eq!(m.parameters().unwrap(), values);
        // Layer 0 weight is [[0,1,2],[3,4,5]], bias [6,7]; output weight [8,9], bias 10.
        let w0 = Vec::<f32>::try_from(m.layers[0].weight.reshape([-1])).unwrap();
        assert_eq!(w0, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let x = Tensor::from_slice(&[1.0f32, 0.0, 0.0]).view([1, 3]);
        // relu([0+6, 3+7]) = [6, 10]; 8*6 + 9*10 + 10 = 148
        let y = m.forward(&x, false).unwrap().double_value(&[0]);
        assert_eq!(y, 148.0);
    }

    #[test]
    fn the_coordinator_computes_the_same_initial_parameters_without_libtorch() {
        for spec in [
            ModelSpec::logistic_regression(5),
            ModelSpec::mlp(7, [4, 3]),
            ModelSpec::cox(3),
        ] {
            for seed in [0, 1, 42] {
                let model = Model::with_device(&spec, seed, Device::Cpu).unwrap();
                assert_eq!(
                    model.parameters().unwrap(),
                    spec.initial_parameters(seed).unwrap(),
                    "{spec:?} seed {seed}"
                );
            }
        }
    }

    #[test]
    fn same_seed_same_init_different_seed_different_init() {
        let spec = ModelSpec::logistic_regression(5);
        let a = Model::with_device(&spec, 1, Device::Cpu).unwrap();
        let b = Model::with_device(&spec, 1, Device::Cpu).unwrap();
        let c = Model::with_device(&spec, 2, Device::Cpu).unwrap();
        let pa = a.parameters().unwrap();
        assert_eq!(pa, b.parameters().unwrap());
        assert_ne!(pa, c.parameters().unwrap());
        let bound = 1.0 / 5f32.sqrt();
        assert!(pa.iter().all(|v| v.abs() <= bound));
        let cox = Model::with_device(&ModelSpec::cox(4), 9, Device::Cpu).unwrap();
        assert_eq!(cox.parameters().unwrap(), vec![0.0; 4]);
    }

    #[test]
    fn set_parameters_checks_width_and_values() {
        let mut m = Model::with_device(&ModelSpec::cox(2), 0, Device::Cpu).unwrap();
        let err = m.set_parameters(&[1.0]).unwrap_err().to_string();
        assert!(
            err.contains("1 values") && err.contains("2 parameters"),
            "{err}"
        );
        assert!(m.set_parameters(&[1.0, f32::NAN]).is_err());
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let spec = ModelSpec::mlp(4, [3]).with_activation(Activation::Gelu);
        let m = Model::with_device(&spec, 3, Device::Cpu).unwrap();
        m.save(&path).unwrap();
        assert!(dir.path().join("model.spec.json").is_file());
        let back = Model::load(&path, Device::Cpu).unwrap();
        assert_eq!(back.spec(), &spec);
        assert_eq!(back.parameters().unwrap(), m.parameters().unwrap());
        let x = [0.5f32, -1.0, 2.0, 0.0];
        assert_eq!(back.predict(&x).unwrap(), m.predict(&x).unwrap());

        let err = m.save(dir.path().join("model.pt")).unwrap_err().to_string();
        assert!(err.contains(".safetensors"), "{err}");
        let err = Model::load(dir.path().join("missing.safetensors"), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.spec.json"), "{err}");
    }
}
