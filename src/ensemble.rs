//! The ensemble as a host-side container: `n` members × `d` state components, row-major f32.

use crate::error::{Error, Result};

/// An ensemble of `n` model states of dimension `d`, stored member-major (row `i` = member `i`).
#[derive(Clone, Debug, PartialEq)]
pub struct Ensemble {
    n: usize,
    d: usize,
    data: Vec<f32>,
}

impl Ensemble {
    /// An ensemble of zeros.
    pub fn zeros(n: usize, d: usize) -> Result<Self> {
        let len = checked_len(n, d)?;
        Ok(Ensemble {
            n,
            d,
            data: vec![0.0; len],
        })
    }

    /// Wraps row-major data of `n` members × `d` components.
    pub fn from_vec(n: usize, d: usize, data: Vec<f32>) -> Result<Self> {
        let len = checked_len(n, d)?;
        if data.len() != len {
            return Err(Error::shape(
                "ensemble data",
                format!("{n} x {d} = {len} values"),
                format!("{} values", data.len()),
            ));
        }
        Ok(Ensemble { n, d, data })
    }

    /// Builds an ensemble from member rows of equal length.
    pub fn from_rows(rows: &[Vec<f32>]) -> Result<Self> {
        let n = rows.len();
        let d = rows.first().map_or(0, |r| r.len());
        let mut data = Vec::with_capacity(n * d);
        for (i, r) in rows.iter().enumerate() {
            if r.len() != d {
                return Err(Error::shape(
                    format!("ensemble member {i}"),
                    format!("{d} components"),
                    format!("{} components", r.len()),
                ));
            }
            data.extend_from_slice(r);
        }
        Ensemble::from_vec(n, d, data)
    }

    /// Number of members.
    pub fn n(&self) -> usize {
        self.n
    }

    /// State dimension.
    pub fn d(&self) -> usize {
        self.d
    }

    /// All values, row-major.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// All values, row-major, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Member `i` (panics if `i >= n`, like slice indexing).
    pub fn member(&self, i: usize) -> &[f32] {
        &self.data[i * self.d..(i + 1) * self.d]
    }

    /// Member `i`, mutable.
    pub fn member_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.d..(i + 1) * self.d]
    }

    /// The ensemble mean (accumulated in f64).
    pub fn mean(&self) -> Vec<f64> {
        let mut m = vec![0.0f64; self.d];
        for i in 0..self.n {
            for (acc, &v) in m.iter_mut().zip(self.member(i)) {
                *acc += v as f64;
            }
        }
        let inv = 1.0 / self.n.max(1) as f64;
        m.iter_mut().for_each(|v| *v *= inv);
        m
    }

    /// Consumes the ensemble, returning its row-major data.
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }
}

fn checked_len(n: usize, d: usize) -> Result<usize> {
    n.checked_mul(d).ok_or_else(|| Error::TooLarge {
        detail: format!("an ensemble of {n} x {d} values overflows the address space"),
    })
}
