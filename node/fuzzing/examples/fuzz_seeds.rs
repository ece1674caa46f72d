//! Seed corpora for the fuzz targets, made by our own fixture builder (scripts/fuzz.sh runs it
//! before fuzzing): `cargo run -p fc-fuzzing --example fuzz_seeds -- DIR` writes `DIR/<target>/*`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: fuzz_seeds DIR (the corpus root)")?,
    );
    let n = fc_fixtures::write_fuzz_seeds(&dir)?;
    println!("{n} seeds in {}", dir.display());
    Ok(())
}
