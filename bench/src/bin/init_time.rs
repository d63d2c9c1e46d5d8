//! Time to build a freshly initialised model of each built-in size on the
//! CPU backend (host-side seeded truncated-normal draws + upload).
//! Usage: `cargo run --release -p twinhead-bench --bin init_time [-- NAME…]`
use std::time::Instant;

use twinhead_model::CpuBackend as B;
use twinhead_model::{Flavour, ModelConfig, ModernBert};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let names: Vec<String> = std::env::args().skip(1).collect();
    let names = if names.is_empty() {
        vec!["ettin-17m".to_string(), "ettin-150m".to_string()]
    } else {
        names
    };
    for name in names {
        let config = ModelConfig::load(&name)?;
        let t = Instant::now();
        let model = ModernBert::<B>::new(&config, Flavour::Encoder, 0, &Default::default());
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{name}: {} parameters initialised in {secs:.1} s",
            config.num_params()
        );
        drop(model);
    }
    Ok(())
}
