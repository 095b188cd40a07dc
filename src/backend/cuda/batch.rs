//! A batch's way onto the device: gathering rows of the resident dataset and warping images,
//! with their indices and matrices either sent from the host or already on the device (the fed
//! step of train/feed.rs).

use super::emu::KArg;
use super::{i32_of, CudaBackend, BLOCK};
use crate::backend::{Interp, RotateGeom, Storage};
use anyhow::Result;

impl CudaBackend {
    /// warp_f32 with its matrices and fill already on the device.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn warp_launch(
        &self,
        x: &Storage,
        ms: KArg,
        fv: KArg,
        interp: Interp,
        y: &mut Storage,
        g: &RotateGeom,
    ) -> Result<()> {
        let len = g.len();
        if len == 0 {
            return Ok(());
        }
        // The kernel indexes within a plane and over planes in 32-bit arithmetic.
        i32_of(g.h * g.w, "H·W")?;
        i32_of(g.n * g.c, "N·C")?;
        let args = [
            self.arg(y, len)?,
            self.arg(x, len)?,
            ms,
            fv,
            KArg::I32(match interp {
                Interp::Nearest => 0,
                Interp::Bilinear => 1,
            }),
            i32_of(g.n, "N")?,
            i32_of(g.c, "C")?,
            i32_of(g.h, "H")?,
            i32_of(g.w, "W")?,
        ];
        self.launch("warp_f32", self.ew_grid(len), BLOCK, 0, &args)
    }

    /// gather_rows_f32 with the indices at `idx`.
    pub(super) fn gather_launch(
        &self,
        src: &Storage,
        row_len: usize,
        idx: KArg,
        n_idx: usize,
        dst: &mut Storage,
    ) -> Result<()> {
        let rows = self.buf(src)?.len() / row_len.max(1);
        let n = n_idx * row_len;
        let args = vec![
            self.arg(dst, n)?,
            self.arg(src, rows * row_len)?,
            idx,
            KArg::I64(n_idx as i64),
            KArg::I64(row_len as i64),
        ];
        if n > 0 {
            self.launch("gather_rows_f32", self.ew_grid(n), BLOCK, 0, &args)?;
        }
        Ok(())
    }
}
