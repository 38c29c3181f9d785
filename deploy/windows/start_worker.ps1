<#
.SYNOPSIS
  Runs one courier worker in the foreground, with the old worker's parameters.
.EXAMPLE
  .\start_worker.ps1 -WorkerId worker-1 -Concurrency 4 -RetryInterval 30
#>
param(
    [string]$WorkerId = "worker-1",
    [int]$Concurrency = 4,
    [int]$RetryInterval = 30,
    [int]$MaxAttempts = 10000,
    [int]$MetricsPort = 9100,
    [ValidateSet("DEBUG", "INFO", "WARNING", "ERROR")]
    [string]$LogLevel = "INFO",
    [string]$Courier = (Join-Path $PSScriptRoot "courier.exe"),
    [string]$Config = (Join-Path $PSScriptRoot "config.yaml")
)
$ErrorActionPreference = "Stop"
if (-not (Test-Path $Courier)) { throw "courier.exe not found at $Courier; pass -Courier PATH" }

$env:WORKER_ID = $WorkerId
$env:WORKER_CONCURRENCY = "$Concurrency"
$env:WORKER_RETRY_INTERVAL = "$RetryInterval"
$env:WORKER_MAX_ATTEMPTS = "$MaxAttempts"
$env:WORKER_METRICS_PORT = "$MetricsPort"
$env:LOG_LEVEL = $LogLevel
if (-not $env:LOG_FILE_PATH) { $env:LOG_FILE_PATH = Join-Path $PSScriptRoot "logs\$WorkerId" }

# Ctrl+C drains in-flight deliveries (up to worker.shutdown_grace, 25 s) and exits 0.
$arguments = @("run")
if (Test-Path $Config) { $arguments += @("--config", $Config) }
& $Courier @arguments
exit $LASTEXITCODE
