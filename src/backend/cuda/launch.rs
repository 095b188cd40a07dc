//! Launch shapes of the CUDA backend that follow from a kernel's contract and the GPU's size
//! alone: pure functions, so the choice for an H100/H200 (132 SMs) is tested without one.

use super::BLOCK;

/// Blocks of `BLOCK` threads for a grid-stride elementwise kernel over `n` values, `per_thread`
/// at a time (4 for kernels/elementwise.cu's float4 path, else 1), on `sm_count` SMs: one step
/// per thread while that fits under the cap, then the grid-stride loop takes over. An sm_90 SM
/// holds 2048 threads, 8 such blocks, when registers allow; the cap is four of those full waves,
/// so a kernel whose registers allow only 5 to 7 resident blocks per SM still loses at most about
/// a tenth to the last, partly filled wave, while the block count stays far from where launching
/// blocks costs more than the loop.
pub(super) const EW_BLOCKS_PER_SM: usize = 32;

pub(super) fn ew_blocks(n: usize, per_thread: usize, sm_count: u32) -> u32 {
    let cap = EW_BLOCKS_PER_SM * (sm_count as usize).max(1);
    n.div_ceil(BLOCK.0 as usize * per_thread.max(1)).clamp(1, cap) as u32
}

/// sum_rows_f32's grid for `cols` columns: one block per 32-column tile, its contract in
/// kernels/data.cu.
pub(super) fn sum_rows_blocks(cols: usize) -> usize {
    cols.div_ceil(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H200_SMS: u32 = 132;

    /// sm_90 holds 2048 threads per SM: a large elementwise launch must offer at least that many
    /// per SM, or the GPU runs part empty however long the loop.
    #[test]
    fn elementwise_grid_fills_an_h200() {
        let full = H200_SMS as usize * 2048 / BLOCK.0 as usize;
        for per_thread in [1, 4] {
            for n in [1usize << 22, 1 << 26, 1 << 30] {
                let b = ew_blocks(n, per_thread, H200_SMS) as usize;
                assert!(b >= full, "{n} values, {per_thread} a step: {b} blocks, {full} fill the GPU");
                assert!(b <= EW_BLOCKS_PER_SM * H200_SMS as usize, "{n} values: {b} blocks over the cap");
            }
        }
        // Small launches: one step per thread, no block without work, never an empty grid.
        assert_eq!(ew_blocks(0, 1, H200_SMS), 1);
        assert_eq!(ew_blocks(1, 4, H200_SMS), 1);
        assert_eq!(ew_blocks(256 * 100 + 1, 1, H200_SMS), 101);
        assert_eq!(ew_blocks(1024 * 100 + 1, 4, H200_SMS), 101);
        // A device that reports no SMs still gets a grid.
        assert_eq!(ew_blocks(1 << 20, 1, 0), EW_BLOCKS_PER_SM as u32);
    }

    /// kernels/data.cu: a sum_rows_f32 block owns 32 adjacent columns; every column must fall in
    /// a block of the first pass over the grid, and no block may be left without a column.
    #[test]
    fn sum_rows_grid_is_one_block_per_column_tile() {
        for cols in [1usize, 10, 31, 32, 33, 84, 256, 257, 1000, 4096] {
            let blocks = sum_rows_blocks(cols);
            assert!(blocks * 32 >= cols, "{cols} columns: {blocks} blocks leave columns to a second pass");
            assert!((blocks - 1) * 32 < cols, "{cols} columns: {blocks} blocks, the last has none");
        }
    }
}
