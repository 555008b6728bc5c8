//! The `palisade` command line: parse arguments, call into the library, map outcomes to exit
//! codes (0 clean, 1 config or start error, 2 usage error).

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use palisade::app::{self, StartError};
use palisade::config;
use palisade::logging::{self, LogFormat};

#[global_allocator]
static ALLOC: Allocator = Allocator;

/// mimalloc, asked for plain memory whenever the alignment allows. The mimalloc crate asks
/// for aligned memory on every allocation, and mimalloc 3 serves an aligned request above
/// 1 KiB whose size is not a power of two by over-allocating (callgrind: about 1k
/// instructions per proxied request, for the request's future and read buffers). Every
/// mimalloc block is at least 8-byte aligned (block sizes are whole words, pages start
/// 16-byte aligned), so a request that needs no more gets `mi_malloc`.
struct Allocator;

/// The alignment every `mi_malloc` block has.
const PLAIN_ALIGN: usize = 8;

/// Alignments up to this are first tried with a plain block (see [`Allocator::alloc`]).
const TRY_PLAIN_ALIGN: usize = 4096;

// SAFETY: each method hands memory from mimalloc back to mimalloc: `mi_malloc`,
// `mi_zalloc` and `mi_realloc` blocks are 8-byte aligned and used only for layouts that
// ask no more, or after checking that the block happens to have the alignment asked for;
// any other layout goes to the mimalloc crate's own (aligned) calls; every block, however
// allocated, is freed by `mi_free`, which is what the crate's `dealloc` calls.
unsafe impl GlobalAlloc for Allocator {
    /// Layouts aligned to more than 8 bytes (tokio's task cells are 128-byte aligned)
    /// first take a plain block and keep it when it happens to be aligned: for a size
    /// above its small sizes that is not a power of two, mimalloc 3's aligned call
    /// allocates `size + align - 1`, which moved a connection's 3,584-byte task cell into
    /// the 4 KiB size class (+512 bytes per connection); plain blocks of a size class
    /// that is a multiple of the alignment usually are aligned already.
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mi_malloc takes any size.
        match plain_block(layout, |size| unsafe { libmimalloc_sys::mi_malloc(size) }) {
            Some(p) => p,
            // SAFETY: the caller's contract for `alloc`, passed on.
            None => unsafe { mimalloc::MiMalloc.alloc(layout) },
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mi_zalloc takes any size (and zeroes the block).
        match plain_block(layout, |size| unsafe { libmimalloc_sys::mi_zalloc(size) }) {
            Some(p) => p,
            // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
            None => unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) },
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc (mi_free takes any
        // mimalloc block).
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= PLAIN_ALIGN {
            // SAFETY: `ptr` is a live mimalloc block; the new block keeps 8-byte alignment.
            unsafe { libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            // SAFETY: the caller's contract for `realloc`, passed on.
            unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
        }
    }
}

/// A block from `plain` (mi_malloc or mi_zalloc) for `layout` when one will do: always
/// for alignments up to 8; for larger ones up to 4 KiB when the block happens to be
/// aligned (else it is freed again). `None`: use mimalloc's aligned call.
#[inline]
fn plain_block(layout: Layout, plain: impl FnOnce(usize) -> *mut c_void) -> Option<*mut u8> {
    let align = layout.align();
    if align > TRY_PLAIN_ALIGN || (align > PLAIN_ALIGN && layout.size() < align) {
        return None;
    }
    let p: *mut u8 = plain(layout.size()).cast();
    if align <= PLAIN_ALIGN || p.is_null() || p.align_offset(align) == 0 {
        return Some(p);
    }
    // SAFETY: `p` is the live mimalloc block just allocated, not handed out.
    unsafe { libmimalloc_sys::mi_free(p.cast()) };
    None
}

#[derive(Debug, Parser)]
#[command(
    name = "palisade",
    version,
    about = "HTTP reverse proxy and load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file [default: $PALISADE_CONFIG, else config/palisade.toml].
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
    /// Log format (default: text on a terminal, json otherwise).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Log level or filter, e.g. `info`, `debug`, `palisade=debug,hyper=info`.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve with the config (the default command).
    Run,
    /// Validate the config and exit.
    Check,
    /// Run the built-in test backend.
    Echo {
        /// Address to listen on, e.g. 127.0.0.1:9001.
        #[arg(long)]
        listen: SocketAddr,
        /// Name reported in every answer.
        #[arg(long, default_value = "echo")]
        name: String,
    },
    /// Proxy on 127.0.0.1:8080 in front of three echo backends on 127.0.0.1:9001-9003.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of main: dropping it flushes the log lines still queued.
    let _log_guard = match logging::init(
        cli.log_format.unwrap_or_else(LogFormat::detect),
        &cli.log_level,
    ) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // `--config`, else a non-empty PALISADE_CONFIG (an empty one is as if unset, as a
    // shell's `PALISADE_CONFIG= palisade` means), else the default path.
    let config_path = cli.config.clone().unwrap_or_else(|| {
        std::env::var_os("PALISADE_CONFIG")
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from("config/palisade.toml"), PathBuf::from)
    });
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => check(&config_path),
        Command::Run => {
            let config = match config::load(&config_path) {
                Ok(config) => config,
                Err(errors) => return config_errors(&errors),
            };
            for warning in config::warnings(&config) {
                tracing::warn!("{warning}");
            }
            block_on(app::run(config))
        }
        Command::Demo => block_on(app::demo()),
        Command::Echo { listen, name } => block_on(async move {
            let listener =
                palisade::server::bind_exclusive(listen).map_err(|source| StartError::Bind {
                    addr: listen,
                    setting: "echo --listen",
                    source,
                })?;
            tracing::info!(%listen, %name, "echo backend listening");
            let name: Arc<str> = name.into();
            palisade::echo::serve(listener, name, app::shutdown_signal())
                .await
                .map_err(|source| StartError::Bind {
                    addr: listen,
                    setting: "echo --listen",
                    source,
                })
        }),
    }
}

fn check(path: &Path) -> ExitCode {
    // Certificates and keys are read too: a missing or mismatched PEM file is a config error.
    match config::load(path).and_then(|c| palisade::tls::build(&c).map(|_| c)) {
        Ok(config) => {
            for warning in config::warnings(&config) {
                eprintln!("warning: {warning}");
            }
            if config::read(path).is_ok_and(|text| config::is_blank(&text)) {
                eprintln!(
                    "warning: {}: the file holds no setting: palisade starts with the defaults (no routes: every request 404), and a reload refuses such a file",
                    path.display()
                );
            }
            println!("config OK: {}", config.summary());
            ExitCode::SUCCESS
        }
        Err(errors) => config_errors(&errors),
    }
}

fn config_errors(errors: &[config::ConfigError]) -> ExitCode {
    for e in errors {
        eprintln!("error: {e}");
    }
    ExitCode::from(1)
}

fn block_on(future: impl std::future::Future<Output = Result<(), StartError>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartError::Config(errors)) => config_errors(&errors),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
