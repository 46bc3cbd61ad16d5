//! The `plexd-metrics` node agent.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use plexd_metrics::agent::Agent;
use plexd_metrics::config::Config;
use plexd_metrics::logging::{self, LogFormat};
use plexd_metrics::memory::CountingAllocator;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Exit code for a configuration or environment the user has to fix.
const EXIT_CONFIG: u8 = 2;

/// Node metrics agent for WireGuard meshes.
///
/// Collects system, agent and (with eBPF) per-interface packet figures every collect
/// interval and reports them in batches. Without a control plane in the config, each batch
/// is printed to stdout as one line of JSON. Logs go to stderr.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// YAML config file; without it every setting takes its default.
    #[arg(long, short = 'c', value_name = "PATH", env = "PLEXD_METRICS_CONFIG")]
    config: Option<PathBuf>,

    /// Run one collect cycle, print the batch as a JSON array on stdout, and exit.
    #[arg(long, conflicts_with = "check_config")]
    once: bool,

    /// Validate the config, print every problem found, and exit (2 when invalid).
    #[arg(long)]
    check_config: bool,

    /// Log level (error, warn, info, debug, trace) or a filter such as
    /// `plexd_metrics=debug,aya=warn`. RUST_LOG overrides it.
    #[arg(
        long,
        value_name = "LEVEL",
        default_value = "info",
        env = "PLEXD_METRICS_LOG_LEVEL"
    )]
    log_level: String,

    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "PLEXD_METRICS_LOG_FORMAT")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    plexd_metrics::memory::use_one_arena();
    let cli = Cli::parse();
    if let Err(e) = logging::init(&cli.log_level, cli.log_format) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }

    let loaded = Config::load_with_env(cli.config.as_deref(), std::env::vars_os());
    let settings = match loaded.and_then(|c| c.validate()) {
        Ok(settings) => settings,
        Err(e) => {
            for line in e.lines() {
                eprintln!("error: {line}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check_config {
        println!("configuration is valid");
        let queue = &settings.config.metrics.queue;
        match &queue.dir {
            Some(dir) => println!(
                "queue: durable, in {} (at most {}; the oldest batches go beyond it)",
                dir.display(),
                queue.max_bytes.display().iec()
            ),
            None => println!(
                "queue: in memory (at most {} points; set metrics.queue.dir to keep them across restarts)",
                queue.max_points
            ),
        }
        return ExitCode::SUCCESS;
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let agent = match Agent::build(&settings) {
            Ok(agent) => agent,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        if cli.once {
            let batch = agent.collect_once().await;
            let mut out = std::io::stdout().lock();
            let written = serde_json::to_writer(&mut out, &batch)
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(out))
                .and_then(|()| out.flush());
            return match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write the batch to stdout: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        match agent.run_until_signalled().await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                if e.is_configuration() {
                    ExitCode::from(EXIT_CONFIG)
                } else {
                    ExitCode::FAILURE
                }
            }
        }
    })
}
