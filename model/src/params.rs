//! The flat parameter vector of any Burn module: flattened and loaded back in the module's
//! visiting order (the order every tensor of a model crosses the network in).

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
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
