<#
.SYNOPSIS
  Stops (draining) and removes the CourierWorker1..N services.
.EXAMPLE
  .\uninstall_service.ps1 -NumWorkers 3
#>
param(
    [int]$NumWorkers = 1,
    [string]$Nssm = "nssm.exe"
)
$ErrorActionPreference = "Stop"
for ($i = 1; $i -le $NumWorkers; $i++) {
    $name = "CourierWorker$i"
    & $Nssm stop $name
    & $Nssm remove $name confirm
    Write-Host "removed $name"
}
