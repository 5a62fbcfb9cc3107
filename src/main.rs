//! The envd daemon: parses its flags and runs the library's server.

use std::process::ExitCode;

fn main() -> ExitCode {
    let config = match envd::config::Config::from_args(std::env::args_os()) {
        Ok(config) => config,
        Err(err) => {
            // clap renders help and version requests as "errors" too.
            let code = if err.use_stderr() { 64 } else { 0 };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    // Before anything can fork: fds an earlier image handed over must never
    // reach a child, not even one of envd's own helpers.
    envd::upgrade::close_carried_on_exec(&config.handover_fds);
    if config.version {
        println!("{}", envd::VERSION);
        return ExitCode::SUCCESS;
    }
    if config.handover_version {
        println!("{}", envd::upgrade::handover::format_line());
        return ExitCode::SUCCESS;
    }
    if config.commit {
        println!("{}", option_env!("ENVD_COMMIT").unwrap_or("unknown"));
        return ExitCode::SUCCESS;
    }
    // Lines are shipped wherever the metadata service (which names the
    // collector) is read.
    let (_log, shipper) = envd::telemetry::init(config.verbose, config.metadata_address().is_some());
    match envd::server::run(config, shipper) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("envd stopped: {err}");
            ExitCode::FAILURE
        }
    }
}
