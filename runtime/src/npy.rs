//! NumPy `.npy` files (format version 1.0/2.0): little-endian `<f4`, `<f8`, `<i4`, `<i8`,
//! `|b1` (and `<f2`), C order. Pure byte conversion; the caller does the file IO.

use compiler::interp::Tensor;
use lang::types::Dtype;

pub fn parse(bytes: &[u8]) -> Result<Tensor, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (missing the \\x93NUMPY magic)".into());
    }
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = std::str::from_utf8(bytes.get(start..start + hlen).ok_or("truncated .npy header")?)
        .map_err(|_| "the .npy header is not text")?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))?;
        let rest = header[i + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or("no 'descr' in the .npy header")?;
    if field("fortran_order").map(|r| r.starts_with("True")).unwrap_or(false) {
        return Err("Fortran-order arrays are not supported; save with np.ascontiguousarray".into());
    }
    let shape_txt = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or("no 'shape' in the .npy header")?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>().map_err(|_| format!("bad shape entry `{s}`")))
        .collect::<Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let data = &bytes[start + hlen..];
    let (dtype, width) = match descr {
        "<f4" => (Dtype::F32, 4),
        "<f8" => (Dtype::F64, 8),
        "<f2" => (Dtype::F16, 2),
        "<i4" => (Dtype::I32, 4),
        "<i8" => (Dtype::I64, 8),
        "|b1" => (Dtype::Bool, 1),
        other => return Err(format!("unsupported dtype `{other}` (use <f4, <f8, <i4, <i8 or |b1)")),
    };
    if data.len() < n * width {
        return Err(format!("the .npy data is truncated: {} bytes for {n} elements of {width}", data.len()));
    }
    let values: Vec<f64> = (0..n)
        .map(|i| {
            let b = &data[i * width..(i + 1) * width];
            match descr {
                "<f4" => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                "<f8" => f64::from_le_bytes(b.try_into().unwrap_or([0; 8])),
                "<f2" => half_to_f64(u16::from_le_bytes([b[0], b[1]])),
                "<i4" => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                "<i8" => i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f64,
                _ => (b[0] != 0) as i32 as f64,
            }
        })
        .collect();
    Ok(Tensor { dtype, shape, data: values })
}

fn half_to_f64(h: u16) -> f64 {
    let sign = if h >> 15 == 1 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f64;
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 => {
            if frac == 0.0 {
                f64::INFINITY
            } else {
                f64::NAN
            }
        }
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// Serializes a tensor (bf16 and f16 are written as `<f4`).
pub fn write(t: &Tensor) -> Vec<u8> {
    let descr = match t.dtype {
        Dtype::F64 => "<f8",
        Dtype::I32 => "<i4",
        Dtype::I64 => "<i8",
        Dtype::Bool => "|b1",
        _ => "<f4",
    };
    let shape = match t.shape.len() {
        0 => "()".to_string(),
        1 => format!("({},)", t.shape[0]),
        _ => format!("({})", t.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so the data starts at a multiple of 64 bytes, ending the header with a newline.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in &t.data {
        match t.dtype {
            Dtype::F64 => out.extend_from_slice(&v.to_le_bytes()),
            Dtype::I32 => out.extend_from_slice(&(*v as i32).to_le_bytes()),
            Dtype::I64 => out.extend_from_slice(&(*v as i64).to_le_bytes()),
            Dtype::Bool => out.push((*v != 0.0) as u8),
            _ => out.extend_from_slice(&(*v as f32).to_le_bytes()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for (dtype, data) in [
            (Dtype::F32, vec![1.5, -2.0, 3.25]),
            (Dtype::I64, vec![1.0, -7.0, 9.0]),
            (Dtype::Bool, vec![1.0, 0.0, 1.0]),
        ] {
            let t = Tensor { dtype, shape: vec![3], data };
            assert_eq!(parse(&write(&t)).unwrap(), t);
        }
        let s = Tensor { dtype: Dtype::F64, shape: vec![], data: vec![0.5] };
        assert_eq!(parse(&write(&s)).unwrap(), s);
        assert!(parse(b"not numpy").is_err());
    }
}
