<#
.SYNOPSIS
  Installs courier workers as Windows services with NSSM: CourierWorker1..N, each with its own
  WORKER_ID and metrics port, restarted on exit (but not after a configuration error, exit 78),
  given 40 s to drain on stop, and with stdout/stderr rotated.
.EXAMPLE
  .\install_service.ps1 -NumWorkers 3 -Courier C:\courier\courier.exe -Config C:\courier\config.yaml
#>
param(
    [int]$NumWorkers = 1,
    [int]$BaseMetricsPort = 9100,
    [int]$Concurrency = 4,
    [string]$Courier = "C:\courier\courier.exe",
    [string]$Config = "C:\courier\config.yaml",
    [string]$LogDir = "C:\courier\logs",
    [string]$Nssm = "nssm.exe"
)
$ErrorActionPreference = "Stop"
if (-not (Get-Command $Nssm -ErrorAction SilentlyContinue)) { throw "nssm.exe not found; install it (choco install nssm) or pass -Nssm PATH" }
if (-not (Test-Path $Courier)) { throw "courier.exe not found at $Courier" }
$home_ = Split-Path -Parent $Courier

for ($i = 1; $i -le $NumWorkers; $i++) {
    $name = "CourierWorker$i"
    $port = $BaseMetricsPort + $i - 1
    $logs = Join-Path $LogDir "worker-$i"
    New-Item -ItemType Directory -Force -Path $logs | Out-Null
    & $Nssm install $name $Courier run --config $Config
    & $Nssm set $name AppDirectory $home_
    & $Nssm set $name AppEnvironmentExtra "WORKER_ID=worker-$i" "WORKER_METRICS_PORT=$port" "WORKER_CONCURRENCY=$Concurrency" "LOG_FILE_PATH=$logs"
    & $Nssm set $name DisplayName "courier worker $i"
    & $Nssm set $name Description "courier message delivery worker $i (metrics on port $port)"
    & $Nssm set $name Start SERVICE_AUTO_START
    # Stop: Ctrl+C first, and wait for the drain (worker.shutdown_grace is 25 s).
    & $Nssm set $name AppStopMethodConsole 40000
    & $Nssm set $name AppStopMethodWindow 5000
    & $Nssm set $name AppStopMethodThreads 5000
    # Restart after a crash, after 2 s; a configuration error (exit 78) stays stopped.
    & $Nssm set $name AppExit Default Restart
    & $Nssm set $name AppExit 78 Exit
    & $Nssm set $name AppRestartDelay 2000
    # Console output to files, rotated daily and at 10 MB (courier also writes daily logs).
    & $Nssm set $name AppStdout (Join-Path $logs "service.out.log")
    & $Nssm set $name AppStderr (Join-Path $logs "service.err.log")
    & $Nssm set $name AppRotateFiles 1
    & $Nssm set $name AppRotateOnline 1
    & $Nssm set $name AppRotateSeconds 86400
    & $Nssm set $name AppRotateBytes 10485760
    & $Nssm start $name
    Write-Host "installed and started $name (worker-$i, metrics on port $port)"
}
