//! Tensors on the host, as requests carry them and tensor models take and give them: a shape and
//! one typed, row-major buffer. Row 0..n is dimension 0, the dimension requests are batched on.
//! The ONNX engine that computes them is in [`onnx`]: [`signature`] reads what a graph takes and
//! gives, `plan` cuts it into steps, `conv` runs its convolutions.

#[cfg(feature = "onnx")]
mod conv;
#[cfg(feature = "onnx")]
pub mod onnx;
#[cfg(feature = "onnx")]
mod plan;
#[cfg(feature = "onnx")]
pub mod signature;

use half::{bf16, f16};

/// The element types of the KServe v2 protocol, under its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    Bf16,
    F32,
    F64,
    /// Variable-length byte strings (texts).
    Bytes,
}

impl DataType {
    const NAMES: [(Self, &'static str); 14] = [
        (Self::Bool, "BOOL"),
        (Self::U8, "UINT8"),
        (Self::U16, "UINT16"),
        (Self::U32, "UINT32"),
        (Self::U64, "UINT64"),
        (Self::I8, "INT8"),
        (Self::I16, "INT16"),
        (Self::I32, "INT32"),
        (Self::I64, "INT64"),
        (Self::F16, "FP16"),
        (Self::Bf16, "BF16"),
        (Self::F32, "FP32"),
        (Self::F64, "FP64"),
        (Self::Bytes, "BYTES"),
    ];

    /// The protocol's name: `FP32`, `INT64`, `BYTES`, ...
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(t, _)| *t == self)
            .map(|(_, n)| *n)
            .expect("every datatype has a name")
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(t, _)| *t)
    }

    /// Every name, for error messages.
    pub fn names() -> impl Iterator<Item = &'static str> {
        Self::NAMES.iter().map(|(_, n)| *n)
    }

    /// Bytes per element in the binary encoding; `None` for BYTES, whose elements vary.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            Self::Bool | Self::U8 | Self::I8 => 1,
            Self::U16 | Self::I16 | Self::F16 | Self::Bf16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
            Self::Bytes => return None,
        })
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The elements of a tensor, row-major, in their own type.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<Vec<u8>>),
}

/// Runs `$body` with `$v` bound to the buffer, whatever its type.
macro_rules! each {
    ($data:expr, |$v:ident| $body:expr) => {
        match $data {
            TensorData::Bool($v) => $body,
            TensorData::U8($v) => $body,
            TensorData::U16($v) => $body,
            TensorData::U32($v) => $body,
            TensorData::U64($v) => $body,
            TensorData::I8($v) => $body,
            TensorData::I16($v) => $body,
            TensorData::I32($v) => $body,
            TensorData::I64($v) => $body,
            TensorData::F16($v) => $body,
            TensorData::Bf16($v) => $body,
            TensorData::F32($v) => $body,
            TensorData::F64($v) => $body,
            TensorData::Bytes($v) => $body,
        }
    };
}

/// Like [`each`], for a body that makes a new buffer of the same type.
macro_rules! rewrap {
    ($data:expr, |$v:ident| $body:expr) => {
        match $data {
            TensorData::Bool($v) => TensorData::Bool($body),
            TensorData::U8($v) => TensorData::U8($body),
            TensorData::U16($v) => TensorData::U16($body),
            TensorData::U32($v) => TensorData::U32($body),
            TensorData::U64($v) => TensorData::U64($body),
            TensorData::I8($v) => TensorData::I8($body),
            TensorData::I16($v) => TensorData::I16($body),
            TensorData::I32($v) => TensorData::I32($body),
            TensorData::I64($v) => TensorData::I64($body),
            TensorData::F16($v) => TensorData::F16($body),
            TensorData::Bf16($v) => TensorData::Bf16($body),
            TensorData::F32($v) => TensorData::F32($body),
            TensorData::F64($v) => TensorData::F64($body),
            TensorData::Bytes($v) => TensorData::Bytes($body),
        }
    };
}

impl TensorData {
    pub fn datatype(&self) -> DataType {
        match self {
            Self::Bool(_) => DataType::Bool,
            Self::U8(_) => DataType::U8,
            Self::U16(_) => DataType::U16,
            Self::U32(_) => DataType::U32,
            Self::U64(_) => DataType::U64,
            Self::I8(_) => DataType::I8,
            Self::I16(_) => DataType::I16,
            Self::I32(_) => DataType::I32,
            Self::I64(_) => DataType::I64,
            Self::F16(_) => DataType::F16,
            Self::Bf16(_) => DataType::Bf16,
            Self::F32(_) => DataType::F32,
            Self::F64(_) => DataType::F64,
            Self::Bytes(_) => DataType::Bytes,
        }
    }

    pub fn len(&self) -> usize {
        each!(self, |v| v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An empty buffer of this type with room for `capacity` elements.
    fn empty_like(&self, capacity: usize) -> Self {
        rewrap!(self, |_v| Vec::with_capacity(capacity))
    }

    fn slice(&self, range: std::ops::Range<usize>) -> Self {
        rewrap!(self, |v| v[range].to_vec())
    }

    /// Appends `other`'s elements; false (and nothing appended) when its type differs.
    fn extend_from(&mut self, other: &Self) -> bool {
        macro_rules! pairs {
            ($($variant:ident),*) => {
                match (self, other) {
                    $((Self::$variant(a), Self::$variant(b)) => a.extend_from_slice(b),)*
                    _ => return false,
                }
            };
        }
        pairs!(Bool, U8, U16, U32, U64, I8, I16, I32, I64, F16, Bf16, F32, F64, Bytes);
        true
    }

    /// The index of the first NaN or infinite element, and what it is; `None` for a tensor with
    /// none (and for every non-float type).
    pub fn first_non_finite(&self) -> Option<(usize, f64)> {
        fn find<T: Copy>(v: &[T], f: impl Fn(T) -> f64) -> Option<(usize, f64)> {
            v.iter()
                .map(|&x| f(x))
                .enumerate()
                .find(|(_, x)| !x.is_finite())
        }
        match self {
            Self::F16(v) => find(v, f64::from),
            Self::Bf16(v) => find(v, f64::from),
            Self::F32(v) => find(v, f64::from),
            Self::F64(v) => find(v, |x| x),
            _ => None,
        }
    }
}

/// A shaped tensor whose data holds exactly `shape.product()` elements.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl HostTensor {
    /// Refuses data whose length is not what the shape declares.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self, String> {
        let declared = element_count(&shape)
            .ok_or_else(|| format!("shape {shape:?} has too many elements"))?;
        if declared != data.len() {
            return Err(format!(
                "shape {shape:?} declares {declared} elements but the data holds {}",
                data.len()
            ));
        }
        Ok(Self { shape, data })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &TensorData {
        &self.data
    }

    pub fn into_parts(self) -> (Vec<usize>, TensorData) {
        (self.shape, self.data)
    }

    pub fn datatype(&self) -> DataType {
        self.data.datatype()
    }

    /// The size of dimension 0; 1 for a scalar.
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Rows `start..start + count`, as a tensor of `count` rows.
    pub fn rows_range(&self, start: usize, count: usize) -> Self {
        let row = self.row_len();
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = count;
        }
        Self {
            shape,
            data: self.data.slice(start * row..(start + count) * row),
        }
    }

    /// Stacks tensors along dimension 0. They must share their type and every other dimension.
    pub fn concat_rows(parts: &[&Self]) -> Result<Self, String> {
        let Some(first) = parts.first() else {
            return Err("nothing to concatenate".into());
        };
        let rows: usize = parts.iter().map(|p| p.rows()).sum();
        let mut data = first.data.empty_like(rows * first.row_len());
        for part in parts {
            if part.shape.get(1..) != first.shape.get(1..) || !data.extend_from(&part.data) {
                return Err(format!(
                    "cannot stack a {} tensor of shape {:?} on a {} tensor of shape {:?}",
                    part.datatype(),
                    part.shape,
                    first.datatype(),
                    first.shape
                ));
            }
        }
        let mut shape = first.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = rows;
        }
        Ok(Self { shape, data })
    }
}

/// The product of the dimensions, unless it overflows.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for name in DataType::names() {
            assert_eq!(DataType::from_name(name).unwrap().name(), name);
        }
        assert_eq!(DataType::from_name("FLOAT"), None);
    }

    #[test]
    fn rows_split_and_stack_back() {
        let t = HostTensor::new(vec![3, 2], TensorData::I64(vec![1, 2, 3, 4, 5, 6])).unwrap();
        let parts: Vec<HostTensor> = (0..3).map(|r| t.rows_range(r, 1)).collect();
        assert_eq!(parts[1].shape(), &[1, 2]);
        assert_eq!(parts[1].data(), &TensorData::I64(vec![3, 4]));
        let refs: Vec<&HostTensor> = parts.iter().collect();
        assert_eq!(HostTensor::concat_rows(&refs).unwrap(), t);
    }

    #[test]
    fn stacking_refuses_other_types_and_shapes() {
        let a = HostTensor::new(vec![1, 2], TensorData::F32(vec![1.0, 2.0])).unwrap();
        let b = HostTensor::new(vec![1, 2], TensorData::F64(vec![1.0, 2.0])).unwrap();
        let c = HostTensor::new(vec![1, 3], TensorData::F32(vec![1.0, 2.0, 3.0])).unwrap();
        assert!(HostTensor::concat_rows(&[&a, &b]).is_err());
        assert!(HostTensor::concat_rows(&[&a, &c]).is_err());
    }

    #[test]
    fn shape_and_data_must_agree() {
        let err = HostTensor::new(vec![2, 2], TensorData::U8(vec![1, 2, 3])).unwrap_err();
        assert!(err.contains("declares 4 elements"), "{err}");
        assert!(HostTensor::new(vec![usize::MAX, 3], TensorData::U8(vec![])).is_err());
    }

    #[test]
    fn non_finite_values_are_found_in_float_types_only() {
        let t = TensorData::F32(vec![0.0, 1.0, f32::NAN]);
        assert_eq!(t.first_non_finite().map(|(i, _)| i), Some(2));
        let t = TensorData::F16(vec![f16::from_f32(1.0), f16::INFINITY]);
        assert_eq!(t.first_non_finite(), Some((1, f64::INFINITY)));
        assert_eq!(TensorData::I64(vec![i64::MAX]).first_non_finite(), None);
    }
}
