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
    if config.version {
        println!("{}", envd::VERSION);
        return ExitCode::SUCCESS;
    }
    if config.commit {
        println!("{}", option_env!("ENVD_COMMIT").unwrap_or("unknown"));
        return ExitCode::SUCCESS;
    }
    let _log = envd::telemetry::init(config.verbose);
    match envd::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("envd stopped: {err}");
            ExitCode::FAILURE
        }
    }
}
