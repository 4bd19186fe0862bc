//! Command-line interface: argument parsing and the subcommands, thin over the library.

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::gpu::{self, GpuOptions};

#[derive(Parser, Debug)]
#[command(name = "lorap-gpu", version, about = "Compress LLaMA-family models with LoRAP on any GPU (wgpu)")]
pub struct Cli {
    /// GPU adapter: index or name substring (see `gpu-info`); env LORAP_ADAPTER.
    #[arg(long, global = true)]
    pub adapter: Option<String>,
    /// Cap the storage binding size in bytes (debugging); env LORAP_MAX_BINDING.
    #[arg(long, global = true)]
    pub max_binding: Option<u64>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List GPU adapters with backend, limits and features.
    GpuInfo,
}

impl Cli {
    pub fn gpu_options(&self) -> GpuOptions {
        GpuOptions { adapter: self.adapter.clone(), max_binding: self.max_binding, backends: None }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::GpuInfo => gpu_info(&cli),
    }
}

fn gpu_info(cli: &Cli) -> Result<()> {
    let backends = gpu::context::backends_from_env();
    let adapters = gpu::list_adapters(backends);
    if adapters.is_empty() {
        return Err(gpu::GpuError::NoAdapter { backends }.into());
    }
    for a in &adapters {
        let l = &a.limits;
        println!("[{}] {} ({:?}, {:?}, driver {} {})", a.index, a.info.name, a.info.backend, a.info.device_type, a.info.driver, a.info.driver_info);
        println!("    max storage binding {} B, max buffer {} B, workgroup storage {} B, invocations {}", l.max_storage_buffer_binding_size, l.max_buffer_size, l.max_compute_workgroup_storage_size, l.max_compute_invocations_per_workgroup);
        println!("    storage buffers per stage {}, storage offset alignment {}, subgroup size {}..{}", l.max_storage_buffers_per_shader_stage, l.min_storage_buffer_offset_alignment, a.info.subgroup_min_size, a.info.subgroup_max_size);
        let f = a.features;
        let has = |x: wgpu::Features| if f.contains(x) { "yes" } else { "no" };
        println!("    f16 {}, subgroups {}, f64 {}, timestamps {}", has(wgpu::Features::SHADER_F16), has(wgpu::Features::SUBGROUP), has(wgpu::Features::SHADER_F64), has(wgpu::Features::TIMESTAMP_QUERY));
    }
    let chosen = gpu::Gpu::new(&cli.gpu_options())?;
    println!("selected: {} ({:?}), effective storage binding {} B", chosen.info.name, chosen.info.backend, chosen.max_binding_bytes());
    Ok(())
}
