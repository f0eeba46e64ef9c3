//! CPU kernels for the image CNN's hot operations, registered with Burn as a backend extension
//! of its `flex` CPU backend, with hand-written backward passes for autodiff.
//!
//! Why: profiling one local epoch of the Fashion-MNIST CNN on burn-flex 0.22.1 showed two
//! thirds of the time in two places. `max_pool2d_with_indices` is a generic 3-D loop that
//! computes window bounds with divisions for every output (12 ns an output), and the weight
//! gradient of a convolution is Burn's default (a convolution of the input with the output
//! gradient as a 28×28 kernel), 5× the cost of the forward pass. Here a 3×3 "same"
//! convolution is im2col into one buffer per image and a `gemm` call, forward and backward,
//! and a 2×2 max-pool keeps the winning position of each window in one byte.
//!
//! Batches are spread over the current Rayon pool, one image at a time, so a participant
//! training with one thread runs them in order and one with all cores splits the batch.
//! Only f32 tensors on the flex device take these paths ([`supported`]); any other device or
//! element type (wgpu, int8 weights) uses Burn's own modules, which compute the same function.

use std::borrow::Cow;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, DispatchDevice, Flex};
use burn::backend::{TensorMetadata, backend_extension};
use burn::tensor::{DType, Shape, Tensor, TensorData};
use rayon::prelude::*;

/// The CNN's operations, as a Burn backend extension (flex, and autodiff over flex).
#[backend_extension(Flex, Autodiff)]
pub trait CnnKernels: Backend {
    /// Convolution with a square kernel, stride 1 and `padding` zeros on every side: `x`
    /// `[B, C, H, W]`, `weight` `[O, C, K, K]`, `bias` `[O]`, out `[B, O, H + 2p − K + 1,
    /// W + 2p − K + 1]`.
    fn conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// 2×2 max-pooling with stride 2 (an odd last row or column is dropped, as PyTorch and
    /// Burn do): `[B, C, H, W]` to `[B, C, H/2, W/2]`.
    fn max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Whether `t` can take these kernels: an f32 tensor on the flex device (with or without
/// autodiff).
pub fn supported<const D: usize>(t: &Tensor<D>) -> bool {
    t.dtype() == DType::F32 && matches!(t.device().inner().as_dispatch(), DispatchDevice::Flex(_))
}

/// [`CnnKernels::conv2d`] on tensors. Callers check [`supported`] for every argument and
/// that the kernel is square and fits the padded input.
pub fn conv2d(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>, padding: usize) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as CnnKernels>::conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        padding,
    ))
}

/// [`CnnKernels::max_pool2x2`] on tensors. Callers check [`supported`].
pub fn max_pool2x2(x: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as CnnKernels>::max_pool2x2(x.into_dispatch()))
}

impl CnnKernels for Flex {
    fn conv2d(x: FlexTensor, weight: FlexTensor, bias: FlexTensor, padding: usize) -> FlexTensor {
        conv2d_forward(&x, &weight, &bias, padding)
    }

    fn max_pool2x2(x: FlexTensor) -> FlexTensor {
        max_pool2x2_forward(&x).0
    }
}

#[derive(Debug)]
struct Conv2dBackward;

impl Backward<Flex, 3> for Conv2dBackward {
    /// The input, the weight and the padding.
    type State = (FlexTensor, FlexTensor, usize);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, w, padding) = ops.state;
        let g = conv2d_backward(&x, &w, &grad, padding, node_x.is_some());
        if let (Some(node), Some(gx)) = (node_x, g.x) {
            grads.register::<Flex>(node.id, gx);
        }
        if let Some(node) = node_w {
            grads.register::<Flex>(node.id, g.weight);
        }
        if let Some(node) = node_b {
            grads.register::<Flex>(node.id, g.bias);
        }
    }
}

#[derive(Debug)]
struct MaxPool2x2Backward;

impl Backward<Flex, 1> for MaxPool2x2Backward {
    /// The input's shape and each window's winning position (0..4, row-major in the window).
    type State = (Shape, Arc<Vec<u8>>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node_x {
            let (shape, winners) = ops.state;
            grads.register::<Flex>(node.id, max_pool2x2_backward(&shape, &winners, &grad));
        }
    }
}

impl<C: CheckpointStrategy> CnnKernels for Autodiff<Flex, C> {
    fn conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: usize,
    ) -> FloatTensor<Self> {
        match Conv2dBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, w, b) = (Self::inner(x), Self::inner(weight), Self::inner(bias));
                let out = conv2d_forward(&x, &w, &b, padding);
                prep.finish((x, w, padding), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(conv2d_forward(
                &Self::inner(x),
                &Self::inner(weight),
                &Self::inner(bias),
                padding,
            )),
        }
    }

    fn max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match MaxPool2x2Backward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = Self::inner(x);
                let (out, winners) = max_pool2x2_forward(&x);
                prep.finish((x.shape(), Arc::new(winners)), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(max_pool2x2_forward(&Self::inner(x)).0),
        }
    }
}

/// Whether `items` independent pieces of work go to the current Rayon pool. Handing work to
/// a pool wakes its threads (tens of microseconds a call), worth it only when there is more
/// than one piece and more than one thread; otherwise the calling thread does it all.
fn parallel(items: usize) -> bool {
    items > 1 && rayon::current_num_threads() > 1
}

/// A tensor's values in row-major order (borrowed when it is already laid out so).
fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    assert_eq!(
        t.dtype(),
        DType::F32,
        "cohort's CNN kernels take f32 tensors"
    );
    match t.as_slice::<f32>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(
            t.to_contiguous()
                .as_slice::<f32>()
                .expect("contiguous")
                .to_vec(),
        ),
    }
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    t.shape().dims::<4>()
}

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`, each given by its row and column strides.
#[allow(clippy::too_many_arguments)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    assert!(dst.len() >= m * n, "gemm destination too small");
    assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(k == 0 || n == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the asserts above keep every index gemm reads or writes inside the slices, and
    // `dst` does not alias the inputs (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A convolution's geometry: input `c × h × w`, kernel `k × k`, `p` zeros on every side,
/// stride 1, output `oh × ow`.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    p: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(x: [usize; 4], weight: [usize; 4], bias: usize, p: usize) -> Self {
        let [_, c, h, w] = x;
        let k = weight[2];
        assert!(
            weight[1] == c
                && weight[3] == k
                && bias == weight[0]
                && k > 0
                && k <= h + 2 * p
                && k <= w + 2 * p,
            "conv2d: input {x:?}, weight {weight:?}, bias [{bias}], padding {p} do not fit"
        );
        Geometry {
            c,
            h,
            w,
            k,
            p,
            oh: h + 2 * p - k + 1,
            ow: w + 2 * p - k + 1,
        }
    }

    /// For kernel offset `(ki, kj)`: the input row of output row `y` (if inside), and the
    /// output columns `lo..hi` whose input column `x + kj − p` is inside.
    fn row(&self, y: usize, ki: usize) -> Option<usize> {
        (y + ki).checked_sub(self.p).filter(|&r| r < self.h)
    }
    fn cols(&self, kj: usize) -> (usize, usize) {
        let lo = self.p.saturating_sub(kj).min(self.ow);
        let hi = (self.w + self.p).saturating_sub(kj).min(self.ow).max(lo);
        (lo, hi)
    }
}

/// One image's im2col: row `(c, ki, kj)` holds the input shifted by `(ki − p, kj − p)`, zero
/// outside, so that `weight[O, C·K²] · cols[C·K², OH·OW]` is the convolution.
fn im2col(x: &[f32], g: &Geometry, cols: &mut [f32]) {
    let (hw, ohw, k) = (g.h * g.w, g.oh * g.ow, g.k);
    for ci in 0..g.c {
        let plane = &x[ci * hw..(ci + 1) * hw];
        for ki in 0..k {
            for kj in 0..k {
                let row = &mut cols[(ci * k * k + ki * k + kj) * ohw..][..ohw];
                let (lo, hi) = g.cols(kj);
                for y in 0..g.oh {
                    let out = &mut row[y * g.ow..(y + 1) * g.ow];
                    let Some(r) = g.row(y, ki) else {
                        out.fill(0.0);
                        continue;
                    };
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    if hi > lo {
                        let from = r * g.w + lo + kj - g.p;
                        out[lo..hi].copy_from_slice(&plane[from..from + (hi - lo)]);
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds each row of `cols` back at its shift into `dx`.
fn col2im(cols: &[f32], g: &Geometry, dx: &mut [f32]) {
    let (hw, ohw, k) = (g.h * g.w, g.oh * g.ow, g.k);
    for ci in 0..g.c {
        let plane = &mut dx[ci * hw..(ci + 1) * hw];
        for ki in 0..k {
            for kj in 0..k {
                let row = &cols[(ci * k * k + ki * k + kj) * ohw..][..ohw];
                let (lo, hi) = g.cols(kj);
                if hi <= lo {
                    continue;
                }
                for y in 0..g.oh {
                    let Some(r) = g.row(y, ki) else {
                        continue;
                    };
                    let from = r * g.w + lo + kj - g.p;
                    let dst = &mut plane[from..from + (hi - lo)];
                    for (a, b) in dst.iter_mut().zip(&row[y * g.ow + lo..y * g.ow + hi]) {
                        *a += b;
                    }
                }
            }
        }
    }
}

/// Forward pass of [`CnnKernels::conv2d`].
pub fn conv2d_forward(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: &FlexTensor,
    padding: usize,
) -> FlexTensor {
    let n = dims4(x)[0];
    let o = dims4(weight)[0];
    let g = Geometry::new(
        dims4(x),
        dims4(weight),
        bias.shape().num_elements(),
        padding,
    );
    let (xv, wv, bv) = (values(x), values(weight), values(bias));
    let (chw, ohw, k) = (g.c * g.h * g.w, g.oh * g.ow, g.c * g.k * g.k);
    let mut out = vec![0.0f32; n * o * ohw];
    // One im2col buffer per worker, reused for each of its images.
    let image = |cols: &mut Vec<f32>, (b, out): (usize, &mut [f32])| {
        im2col(&xv[b * chw..(b + 1) * chw], &g, cols);
        for (oc, row) in out.chunks_mut(ohw).enumerate() {
            row.fill(bv[oc]);
        }
        matmul((o, ohw, k), out, true, &wv, (k, 1), cols, (ohw, 1));
    };
    let new_cols = || vec![0.0f32; k * ohw];
    if parallel(n) {
        out.par_chunks_mut(o * ohw)
            .enumerate()
            .for_each_init(new_cols, image);
    } else {
        let mut cols = new_cols();
        out.chunks_mut(o * ohw)
            .enumerate()
            .for_each(|item| image(&mut cols, item));
    }
    tensor(out, Shape::new([n, o, g.oh, g.ow]))
}

/// Images per group in the backward pass (see [`conv2d_backward`]).
const GROUP: usize = 4;

/// Gradients of [`CnnKernels::conv2d`].
pub struct Conv2dGrads {
    /// `None` unless asked for (the first layer's input needs none).
    pub x: Option<FlexTensor>,
    pub weight: FlexTensor,
    pub bias: FlexTensor,
}

/// Backward pass of [`CnnKernels::conv2d`] for the output gradient `grad` `[B, O, OH, OW]`.
pub fn conv2d_backward(
    x: &FlexTensor,
    weight: &FlexTensor,
    grad: &FlexTensor,
    padding: usize,
    want_x: bool,
) -> Conv2dGrads {
    let n = dims4(x)[0];
    let o = dims4(weight)[0];
    let geo = Geometry::new(dims4(x), dims4(weight), o, padding);
    let (c, ohw, kk) = (geo.c, geo.oh * geo.ow, geo.k);
    assert_eq!(
        dims4(grad),
        [n, o, geo.oh, geo.ow],
        "conv2d: output gradient shape"
    );
    let (xv, wv, gv) = (values(x), values(weight), values(grad));
    let (hw, k) = (geo.h * geo.w, c * kk * kk);
    let mut dx = vec![0.0f32; if want_x { n * c * hw } else { 0 }];
    // Images go in fixed groups whatever the thread count; each group sums its images' weight
    // and bias gradients, and the groups' sums are added in order, so the result is the same
    // bit for bit with one thread or many.
    let mut dx_groups: Vec<Option<&mut [f32]>> = if want_x {
        dx.chunks_mut(c * hw * GROUP).map(Some).collect()
    } else {
        (0..n.div_ceil(GROUP)).map(|_| None).collect()
    };
    let group = |(group, dxg): (usize, &mut Option<&mut [f32]>)| {
        let (mut cols, mut dw, mut db) =
            (vec![0.0f32; k * ohw], vec![0.0f32; o * k], vec![0.0f32; o]);
        for b in group * GROUP..((group + 1) * GROUP).min(n) {
            let g = &gv[b * o * ohw..(b + 1) * o * ohw];
            im2col(&xv[b * c * hw..(b + 1) * c * hw], &geo, &mut cols);
            // dW[O, K] += g[O, OHW] · colsᵀ[OHW, K]
            matmul((o, k, ohw), &mut dw, true, g, (ohw, 1), &cols, (1, ohw));
            for (oc, row) in g.chunks(ohw).enumerate() {
                db[oc] += row.iter().sum::<f32>();
            }
            if let Some(dxg) = dxg.as_deref_mut() {
                // dcols[K, OHW] = Wᵀ[K, O] · g[O, OHW], scattered back onto the input.
                matmul((k, ohw, o), &mut cols, false, &wv, (1, k), g, (ohw, 1));
                let local = b - group * GROUP;
                col2im(&cols, &geo, &mut dxg[local * c * hw..(local + 1) * c * hw]);
            }
        }
        (dw, db)
    };
    let groups: Vec<(Vec<f32>, Vec<f32>)> = if parallel(dx_groups.len()) {
        dx_groups.par_iter_mut().enumerate().map(group).collect()
    } else {
        dx_groups.iter_mut().enumerate().map(group).collect()
    };
    let (mut dw, mut db) = (vec![0.0f32; o * k], vec![0.0f32; o]);
    for (gw, gb) in &groups {
        dw.iter_mut().zip(gw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(gb).for_each(|(a, b)| *a += b);
    }
    Conv2dGrads {
        x: want_x.then(|| tensor(dx, Shape::new([n, c, geo.h, geo.w]))),
        weight: tensor(dw, Shape::new([o, c, kk, kk])),
        bias: tensor(db, Shape::new([o])),
    }
}

/// Forward pass of [`CnnKernels::max_pool2x2`]: the output and each window's winner (the
/// first largest value, or the first NaN, in row-major window order).
pub fn max_pool2x2_forward(x: &FlexTensor) -> (FlexTensor, Vec<u8>) {
    let [n, c, h, w] = dims4(x);
    let (oh, ow) = (h / 2, w / 2);
    let xv = values(x);
    let mut out = vec![0.0f32; n * c * oh * ow];
    let mut winners = vec![0u8; n * c * oh * ow];
    if oh * ow > 0 {
        let plane = |(p, (out, win)): (usize, (&mut [f32], &mut [u8]))| {
            let plane = &xv[p * h * w..(p + 1) * h * w];
            for i in 0..oh {
                let (r0, r1) = (&plane[2 * i * w..], &plane[(2 * i + 1) * w..]);
                for j in 0..ow {
                    let v = [r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]];
                    let mut best = 0;
                    for q in 1..4 {
                        if v[q] > v[best] || (v[q].is_nan() && !v[best].is_nan()) {
                            best = q;
                        }
                    }
                    out[i * ow + j] = v[best];
                    win[i * ow + j] = best as u8;
                }
            }
        };
        if parallel(n * c) {
            out.par_chunks_mut(oh * ow)
                .zip(winners.par_chunks_mut(oh * ow))
                .enumerate()
                .for_each(plane);
        } else {
            out.chunks_mut(oh * ow)
                .zip(winners.chunks_mut(oh * ow))
                .enumerate()
                .for_each(plane);
        }
    }
    (tensor(out, Shape::new([n, c, oh, ow])), winners)
}

/// Backward pass of [`CnnKernels::max_pool2x2`]: each output's gradient goes to its winner.
pub fn max_pool2x2_backward(x_shape: &Shape, winners: &[u8], grad: &FlexTensor) -> FlexTensor {
    let [n, c, h, w] = x_shape.dims::<4>();
    let (oh, ow) = (h / 2, w / 2);
    let gv = values(grad);
    assert_eq!(
        gv.len(),
        n * c * oh * ow,
        "max_pool2x2: output gradient shape"
    );
    let mut dx = vec![0.0f32; n * c * h * w];
    if oh * ow > 0 {
        let scatter = |(p, plane): (usize, &mut [f32])| {
            let (g, win) = (
                &gv[p * oh * ow..][..oh * ow],
                &winners[p * oh * ow..][..oh * ow],
            );
            for i in 0..oh {
                for j in 0..ow {
                    let q = win[i * ow + j] as usize;
                    plane[(2 * i + q / 2) * w + 2 * j + q % 2] = g[i * ow + j];
                }
            }
        };
        if parallel(n * c) {
            dx.par_chunks_mut(h * w).enumerate().for_each(scatter);
        } else {
            dx.chunks_mut(h * w).enumerate().for_each(scatter);
        }
    }
    tensor(dx, x_shape.clone())
}

/// `layer.forward(x)`, with int8 weights read directly for small batches on the CPU
/// ([`linear_int8`]).
pub fn linear(layer: &burn::nn::Linear, x: Tensor<2>) -> Tensor<2> {
    let weight = layer.weight.val();
    if matches!(weight.dtype(), DType::QFloat(_)) {
        let bias = layer.bias.as_ref().map(|b| b.val());
        if let Some(y) = linear_int8(&x, &weight, bias.as_ref()) {
            return y;
        }
    }
    layer.forward(x)
}

/// Rows up to which [`linear_int8`] reads the int8 weight directly.
const INT8_DIRECT_ROWS: usize = 4;

/// A linear layer (`x · weight + bias`, Burn's layout: `weight` `[in, out]`) whose weight is
/// int8 with one symmetric scale and whose bias is f32 (a served model, see `crate::infer`), for a few rows at a
/// time on the flex device: each int8 weight is converted in registers as it is used, instead
/// of the whole weight being dequantized into a new f32 tensor first, so a one-example request
/// reads a quarter of the bytes f32 would. `None` where that does not apply (more rows,
/// another device, scheme or dtype, autodiff): Burn's own path then computes the same thing.
pub fn linear_int8(
    x: &Tensor<2>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
) -> Option<Tensor<2>> {
    use burn::backend::{
        BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind,
    };
    use burn::tensor::quantization::QuantValue;
    let [rows, d_in] = x.dims();
    let DType::QFloat(scheme) = weight.dtype() else {
        return None;
    };
    if rows == 0 || rows > INT8_DIRECT_ROWS || scheme.value != QuantValue::Q8S {
        return None;
    }
    let flex_float = |t: DispatchTensor| match t {
        DispatchTensor {
            kind: DispatchTensorKind::Flex(BackendTensor::Float(t)),
            autodiff: DispatchAutodiffContext::Disabled,
        } if t.dtype() == DType::F32 => Some(t),
        _ => None,
    };
    let DispatchTensorKind::Flex(BackendTensor::Quantized(q)) = weight.clone().into_dispatch().kind
    else {
        return None;
    };
    let [w_in, out] = q.tensor().shape().dims::<2>();
    if w_in != d_in || q.scales().len() != 1 {
        return None;
    }
    let scale = q.scales()[0];
    let qt = q.tensor().to_contiguous();
    let qv = qt.as_slice::<i8>()?;
    let xt = flex_float(x.clone().into_dispatch())?;
    let xv = values(&xt);
    let bt = match bias {
        Some(b) => Some(flex_float(b.clone().into_dispatch())?),
        None => None,
    };
    let bv = bt.as_ref().map(values);
    let mut y = vec![0.0f32; rows * out];
    let mut acc = vec![0.0f32; out];
    for (r, yr) in y.chunks_mut(out).enumerate() {
        acc.fill(0.0);
        for (xi, wrow) in xv[r * d_in..(r + 1) * d_in].iter().zip(qv.chunks(out)) {
            for (a, &w) in acc.iter_mut().zip(wrow) {
                *a += xi * w as f32;
            }
        }
        for (o, (yo, a)) in yr.iter_mut().zip(&acc).enumerate() {
            *yo = scale * a + bv.as_ref().map_or(0.0, |b| b[o]);
        }
    }
    Some(Tensor::from_dispatch(DispatchTensor {
        kind: DispatchTensorKind::Flex(BackendTensor::Float(tensor(y, Shape::new([rows, out])))),
        autodiff: DispatchAutodiffContext::Disabled,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::pool::MaxPool2dConfig;
    use burn::tensor::Device;

    fn input(dev: &Device, shape: [usize; 4], seed: usize) -> Tensor<4> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i + seed) * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_data(TensorData::new(v, shape), dev)
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn close(a: Tensor<4>, b: Tensor<4>, what: &str) {
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.into_data().convert::<f32>().try_into_vec().unwrap(),
            b.into_data().convert::<f32>().try_into_vec().unwrap(),
        );
        assert_eq!(a.len(), b.len(), "{what}");
        let d = max_abs_diff(&a, &b);
        assert!(d < 1e-4, "{what}: differs from Burn's by {d}");
    }

    #[test]
    fn conv2d_matches_burns_conv2d_forward_and_backward() {
        let dev = Device::flex().autodiff();
        for (shape, out, k, p) in [
            ([2, 1, 6, 6], 3, 3, 1),
            ([3, 4, 5, 7], 2, 3, 1),
            ([1, 2, 1, 1], 4, 3, 1),
            // LeNet's 5×5 "valid" convolutions, a padded 5×5, a 1×1, a kernel as large as
            // the input, and more padding than the kernel needs.
            ([5, 1, 12, 12], 6, 5, 0),
            ([2, 3, 7, 6], 4, 5, 2),
            ([2, 3, 4, 5], 2, 1, 0),
            ([1, 2, 4, 4], 3, 4, 0),
            ([1, 1, 3, 3], 2, 2, 3),
        ] {
            let conv = Conv2dConfig::new([shape[1], out], [k, k])
                .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                .init(&dev);
            let x = input(&dev, shape, 3).require_grad();
            let w = conv.weight.val();
            let b = conv.bias.as_ref().unwrap().val();
            assert!(supported(&x) && supported(&w) && supported(&b));
            let (burn_out, ours) = (
                conv.forward(x.clone()),
                conv2d(x.clone(), w.clone(), b.clone(), p),
            );
            close(burn_out.clone(), ours.clone(), "forward");
            // The same upstream gradient through both: a weighted sum of the outputs.
            let weights = input(&dev, burn_out.dims(), 11);
            let g1 = (burn_out * weights.clone()).sum().backward();
            let g2 = (ours * weights).sum().backward();
            close(x.grad(&g1).unwrap(), x.grad(&g2).unwrap(), "input gradient");
            close(
                w.grad(&g1).unwrap(),
                w.grad(&g2).unwrap(),
                "weight gradient",
            );
            let (b1, b2) = (b.grad(&g1).unwrap(), b.grad(&g2).unwrap());
            close(
                b1.reshape([1, 1, 1, out]),
                b2.reshape([1, 1, 1, out]),
                "bias gradient",
            );
        }
    }

    #[test]
    fn max_pool2x2_matches_burns_max_pool2d_forward_and_backward() {
        let dev = Device::flex().autodiff();
        let pool = MaxPool2dConfig::new([2, 2]).init();
        for shape in [[2, 3, 4, 6], [1, 2, 5, 7], [1, 1, 1, 3]] {
            // Coarse values, so windows hold ties; both must send the gradient to one place.
            let x = input(&dev, shape, 5).mul_scalar(2.0).round().require_grad();
            let (a, b) = (pool.forward(x.clone()), max_pool2x2(x.clone()));
            close(a.clone(), b.clone(), "forward");
            let weights = input(&dev, a.dims(), 2);
            let g1 = (a * weights.clone()).sum().backward();
            let g2 = (b * weights).sum().backward();
            let (d1, d2) = (x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
            // Ties may be broken differently; the total gradient per window may not.
            let sum = |t: Tensor<4>| -> Vec<f32> {
                t.sum_dim(3).sum_dim(2).into_data().try_into_vec().unwrap()
            };
            assert_eq!(sum(d1.clone()).len(), sum(d2.clone()).len());
            let diff = max_abs_diff(&sum(d1), &sum(d2));
            assert!(diff < 1e-4, "pooled gradient mass differs by {diff}");
        }
    }

    #[test]
    fn int8_linear_reads_the_quantized_weight_directly_and_matches_burn() {
        use burn::module::Quantizer;
        use burn::nn::LinearConfig;
        use burn::tensor::quantization::{Calibration, QuantStore, QuantValue};
        let dev = Device::flex();
        let scheme = dev
            .settings()
            .quantization
            .scheme
            .with_value(QuantValue::Q8S)
            .with_store(QuantStore::Native);
        // The weight int8 and the bias f32, as `InferenceModel` serves a linear layer.
        let layer = LinearConfig::new(20, 7).init(&dev);
        let weight_only = burn::module::ParamGroup::from_ids(vec![layer.weight.id]);
        let layer = layer.quantize_weights_group(
            &mut Quantizer::new(Calibration::MinMax, scheme),
            weight_only,
        );
        let bias = layer.bias.as_ref().map(|b| b.val());
        for rows in [1, 3] {
            let x: Tensor<2> = input(&dev, [1, 1, rows, 20], 1).reshape([rows, 20]);
            let ours = linear_int8(&x, &layer.weight.val(), bias.as_ref())
                .expect("an int8 weight on the CPU takes the direct path");
            close(
                ours.reshape([1, 1, rows, 7]),
                layer.forward(x).reshape([1, 1, rows, 7]),
                "int8 linear",
            );
        }
        let many: Tensor<2> = input(&dev, [1, 1, 8, 20], 1).reshape([8, 20]);
        assert!(linear_int8(&many, &layer.weight.val(), bias.as_ref()).is_none());
    }

    #[test]
    fn ties_and_nan_pick_the_first_winner() {
        let x = tensor(
            vec![1.0, 1.0, 0.0, 5.0, 0.0, 1.0, 5.0, f32::NAN],
            Shape::new([1, 1, 2, 4]),
        );
        let (out, winners) = max_pool2x2_forward(&x);
        let out = values(&out);
        assert_eq!(out[0], 1.0);
        assert!(out[1].is_nan(), "NaN propagates");
        assert_eq!(winners, vec![0, 3]);
        let dx = max_pool2x2_backward(
            &x.shape(),
            &winners,
            &tensor(vec![2.0, 3.0], Shape::new([1, 1, 1, 2])),
        );
        assert_eq!(
            values(&dx).to_vec(),
            vec![2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]
        );
    }
}
