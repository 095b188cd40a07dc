//! Data files written byte for byte in the formats rotvar reads, for tests that need files on
//! disk (shared by the loader, fuzz and robustness tests).
#![allow(dead_code)]

use std::io::Write;

/// An IDX3 unsigned-byte image file: magic 0x0803, count, rows, cols (big-endian), pixels.
pub fn idx_images(n: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in [0x0803u32, n, rows, cols] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(pixels);
    out
}

/// An IDX1 unsigned-byte label file: magic 0x0801, count, labels.
pub fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in [0x0801u32, labels.len() as u32] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(labels);
    out
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}
