//! `bitnet logits`: float32 logits of every position, written as a `.npy` file.

use super::common::{ModelArgs, PromptArgs};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: PromptArgs,
    /// Output file (`[n_tokens, vocab]` float32, NumPy format).
    #[arg(short, long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let m = args.model.load()?;
    let ids = args.input.ids(&m)?;
    let logits = m.model.logits_all(&ids)?;
    let vocab = m.model.spec.vocab;
    bitnet_formats::atomic::write_atomic(&args.out, |w| {
        write_npy_f32(w, &[ids.len(), vocab], logits.iter().flatten().copied()).map_err(|e| {
            bitnet_formats::FormatError::Io {
                path: args.out.clone(),
                source: e,
            }
        })
    })
    .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "wrote {} x {} float32 logits to {}",
        ids.len(),
        vocab,
        args.out.display()
    );
    Ok(())
}

/// NumPy `.npy` version 1.0: magic, header length, a Python dict literal padded with spaces to a
/// multiple of 64 bytes and ended by a newline, then the raw little-endian data.
pub fn write_npy_f32(
    w: &mut dyn Write,
    shape: &[usize],
    values: impl Iterator<Item = f32>,
) -> std::io::Result<()> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat(total.div_ceil(64) * 64 - total));
    header.push('\n');
    w.write_all(b"\x93NUMPY\x01\x00")?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    for v in values {
        w.write_all(&v.to_le_bytes())?;
    }
    Ok(())
}
