//! The flat parameter vector of any Burn module: flattened and loaded back in the module's
//! visiting order (the order every tensor of a model crosses the network in); and its
//! safetensors file, what the model registry stores.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::{Tensor, TensorData};

use crate::ModelError;

/// Every parameter of any module, in its visiting order, as one f32 vector.
pub fn flat<M: Module>(m: &M) -> Vec<f32> {
    let mut f = Flatten { out: Vec::new() };
    m.visit(&mut f);
    f.out
}

/// Replaces every parameter of any module with values from `params` (in its visiting order),
/// keeping parameter ids, devices and gradient requirements; an error names both lengths
/// when they differ.
pub fn load_flat<M: Module>(m: M, params: &[f32]) -> Result<M, ModelError> {
    let expected = m.num_params();
    if params.len() != expected {
        return Err(ModelError::ParameterCount {
            expected,
            got: params.len(),
        });
    }
    let mut u = Unflatten {
        flat: params,
        offset: 0,
    };
    Ok(m.map(&mut u))
}

/// Any module's parameters as a safetensors file, under Burn's names (its module paths).
pub fn to_safetensors<M: Module>(m: &M) -> Result<Vec<u8>, ModelError> {
    let mut st = SafetensorsStore::from_bytes(None);
    m.save_into(&mut st)
        .map_err(|e| ModelError::Store(format!("{e:?}")))?;
    st.get_bytes()
        .map_err(|e| ModelError::Store(format!("{e:?}")))
}

/// Loads a file [`to_safetensors`] wrote into `m`, refusing one that misses or mismatches any
/// of its tensors.
pub fn load_safetensors<M: Module>(m: &mut M, bytes: Vec<u8>) -> Result<(), ModelError> {
    let mut st = SafetensorsStore::from_bytes(Some(bytes));
    let res = m
        .load_from(&mut st)
        .map_err(|e| ModelError::Store(format!("{e:?}")))?;
    if !res.errors.is_empty() || !res.missing.is_empty() {
        return Err(ModelError::Store(format!(
            "safetensors does not fit the model: missing {:?}, errors {:?}",
            res.missing, res.errors
        )));
    }
    Ok(())
}

struct Flatten {
    out: Vec<f32>,
}

impl ModuleVisitor for Flatten {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        self.out.extend(
            p.val()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 tensor data"),
        );
    }
}

struct Unflatten<'a> {
    flat: &'a [f32],
    offset: usize,
}

impl ModuleMapper for Unflatten<'_> {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (shape, dev) = (p.lazy_shape(), p.lazy_device());
        let n = shape.num_elements();
        let t = Tensor::<D>::from_data(
            TensorData::new(self.flat[self.offset..self.offset + n].to_vec(), shape),
            &dev,
        );
        self.offset += n;
        let id = p.id;
        p.transform_for_load(t, id)
    }
}
