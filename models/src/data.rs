//! In-memory training data: [`Dataset`].

#[cfg(feature = "torch")]
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// What a model learns to predict, one entry per row.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Binary labels, each exactly 0.0 or 1.0 (logistic regression, MLP).
    Binary(Vec<f32>),
    /// Right-censored survival (Cox): follow-up time (finite, >= 0, any unit)
    /// and whether the event was observed at that time (`false`: censored).
    Survival {
        /// Time to event or censoring.
        time: Vec<f32>,
        /// `true` where the event happened, `false` where censored.
        event: Vec<bool>,
    },
}

/// Rows of features with their targets, held by one node.
///
/// Features are row-major: row `i` is `features[i * width .. (i + 1) * width]`,
/// in the column order the model spec's `inputs` refers to. Every value must
/// be finite: impute or drop missing values before building a dataset, and
/// standardise features (the node's data pipeline does this with federated
/// means and variances).
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    features: Vec<f32>,
    width: usize,
    targets: Targets,
}

impl Dataset {
    /// A binary-classification dataset.
    pub fn binary(features: Vec<f32>, width: usize, labels: Vec<f32>) -> Result<Self> {
        let rows = check_features(&features, width)?;
        if labels.len() != rows {
            return Err(Error::InvalidDataset(format!(
                "{rows} rows of features but {} labels",
                labels.len()
            )));
        }
        if let Some((i, y)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &y)| y != 0.0 && y != 1.0)
        {
            return Err(Error::InvalidDataset(format!(
                "label of row {i} is {y}; binary labels must be 0 or 1 \
                 (map the outcome to 0/1 before training)"
            )));
        }
        Ok(Dataset {
            features,
            width,
            targets: Targets::Binary(labels),
        })
    }

    /// A right-censored survival dataset for Cox models.
    pub fn survival(
        features: Vec<f32>,
        width: usize,
        time: Vec<f32>,
        event: Vec<bool>,
    ) -> Result<Self> {
        let rows = check_features(&features, width)?;
        if time.len() != rows || event.len() != rows {
            return Err(Error::InvalidDataset(format!(
                "{rows} rows of features but {} times and {} event flags",
                time.len(),
                event.len()
            )));
        }
        if let Some((i, t)) = time
            .iter()
            .enumerate()
            .find(|&(_, t)| !t.is_finite() || *t < 0.0)
        {
            return Err(Error::InvalidDataset(format!(
                "time of row {i} is {t}; survival times must be finite and >= 0"
            )));
        }
        Ok(Dataset {
            features,
            width,
            targets: Targets::Survival { time, event },
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.features.len() / self.width
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }

    /// Features per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The row-major feature matrix.
    pub fn features(&self) -> &[f32] {
        &self.features
    }

    /// The targets.
    pub fn targets(&self) -> &Targets {
        &self.targets
    }

    /// The rows at `indices` (in that order), as a new dataset.
    ///
    /// Panics if an index is out of range (a caller bug, like slice indexing).
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let mut features = Vec::with_capacity(indices.len() * self.width);
        for &i in indices {
            features.extend_from_slice(&self.features[i * self.width..(i + 1) * self.width]);
        }
        let targets = match &self.targets {
            Targets::Binary(y) => Targets::Binary(indices.iter().map(|&i| y[i]).collect()),
            Targets::Survival { time, event } => Targets::Survival {
                time: indices.iter().map(|&i| time[i]).collect(),
                event: indices.iter().map(|&i| event[i]).collect(),
            },
        };
        Dataset {
            features,
            width: self.width,
            targets,
        }
    }

    /// The feature matrix as an `[n, width]` float tensor on `device`.
    #[cfg(feature = "torch")]
    pub(crate) fn feature_tensor(&self, device: Device) -> Result<Tensor> {
        let rows = i64::try_from(self.len()).map_err(|_| too_big())?;
        let width = i64::try_from(self.width).map_err(|_| too_big())?;
        Ok(Tensor::f_from_slice(&self.features)?
            .f_view([rows, width])?
            .f_to_device(device)?)
    }

    /// The binary labels as an `[n]` float tensor on `device`, or `None`
    /// for survival data.
    #[cfg(feature = "torch")]
    pub(crate) fn label_tensor(&self, device: Device) -> Result<Option<Tensor>> {
        match &self.targets {
            Targets::Binary(y) => Ok(Some(
                Tensor::f_from_slice(y)?
                    .f_to_kind(Kind::Float)?
                    .f_to_device(device)?,
            )),
            Targets::Survival { .. } => Ok(None),
        }
    }
}

#[cfg(feature = "torch")]
fn too_big() -> Error {
    Error::InvalidDataset("more rows than libtorch can index".into())
}

fn check_features(features: &[f32], width: usize) -> Result<usize> {
    if width == 0 {
        return Err(Error::InvalidDataset(
            "width is 0; every row needs at least one feature".into(),
        ));
    }
    if !features.len().is_multiple_of(width) {
        return Err(Error::InvalidDataset(format!(
            "{} feature values do not divide into rows of width {width}",
            features.len()
        )));
    }
    if let Some(i) = features.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidDataset(format!(
            "feature {} of row {} is {}; impute or drop missing values first",
            i % width,
            i / width,
            features[i]
        )));
    }
    Ok(features.len() / width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_shapes_and_values() {
        assert!(Dataset::binary(vec![1.0, 2.0, 3.0], 2, vec![0.0]).is_err());
        assert!(Dataset::binary(vec![1.0, 2.0], 2, vec![0.5]).is_err());
        assert!(Dataset::binary(vec![1.0, f32::NAN], 2, vec![1.0]).is_err());
        assert!(Dataset::binary(vec![], 0, vec![]).is_err());
        assert!(Dataset::survival(vec![1.0], 1, vec![-1.0], vec![true]).is_err());
        assert!(Dataset::survival(vec![1.0], 1, vec![2.0], vec![]).is_err());
        let d = Dataset::binary(vec![1.0, 2.0, 3.0, 4.0], 2, vec![0.0, 1.0]).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.width(), 2);
    }

    #[test]
    fn select_keeps_rows_and_targets_together() {
        let d = Dataset::survival(
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            2,
            vec![10.0, 20.0, 30.0],
            vec![true, false, true],
        )
        .unwrap();
        let s = d.select(&[2, 0]);
        assert_eq!(s.features(), &[5.0, 6.0, 1.0, 2.0]);
        assert_eq!(
            s.targets(),
            &Targets::Survival {
                time: vec![30.0, 10.0],
                event: vec![true, true]
            }
        );
    }
}
