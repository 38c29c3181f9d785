<#
.SYNOPSIS
  Starts several courier workers, each in its own window: worker-1..N with metrics ports
  BaseMetricsPort..BaseMetricsPort+N-1.
.EXAMPLE
  .\start_multiple_workers.ps1 -NumWorkers 3 -Concurrency 4
#>
param(
    [int]$NumWorkers = 3,
    [int]$Concurrency = 4,
    [int]$BaseMetricsPort = 9100,
    [int]$RetryInterval = 30,
    [int]$MaxAttempts = 10000,
    [string]$LogLevel = "INFO"
)
$ErrorActionPreference = "Stop"
$script = Join-Path $PSScriptRoot "start_worker.ps1"
for ($i = 1; $i -le $NumWorkers; $i++) {
    $port = $BaseMetricsPort + $i - 1
    Start-Process -FilePath "powershell.exe" -ArgumentList @(
        "-NoProfile", "-ExecutionPolicy", "Bypass", "-File", $script,
        "-WorkerId", "worker-$i", "-Concurrency", $Concurrency, "-MetricsPort", $port,
        "-RetryInterval", $RetryInterval, "-MaxAttempts", $MaxAttempts, "-LogLevel", $LogLevel
    )
    Write-Host "started worker-$i (metrics on http://localhost:$port/metrics)"
}
