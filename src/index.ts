/** dmstate's library API: the engine in-process, its devices, typed events as RxJS Observables. */
export { Engine, DM_MAJOR } from './core/engine.js';
export type { EngineOptions, CreateOptions, DeviceInfo, DeviceRecord } from './core/engine.js';
export { MappedDevice } from './core/mapped-device.js';
export { openPool } from './frontends/open-pool.js';
export type { OpenPool, LoggedEventOf } from './frontends/open-pool.js';
export { LiveInspector, INSPECT_ACTOR_KINDS, INSPECT_EVENTS_PER_SECOND_DEFAULT } from './inspect/live-inspector.js';
export type {
  InspectActorKind, InspectFilter, InspectionRecord, InspectActorRecord, InspectEventRecord, InspectSnapshotRecord, InspectDroppedRecord,
  InspectWatch, InspectWatchStats,
} from './inspect/live-inspector.js';
export { StatelyBridge, STATELY_PROTOCOL_VERSION } from './inspect/live-stately.js';
export type { StatelyMessage } from './inspect/live-stately.js';
export { replay } from './replay/replay.js';
export type { ReplayOptions, ReplayResult } from './replay/replay.js';
export type { PoolState, DeviceState, CowState, MarkState } from './replay/pool-state.js';
export { Daemon } from './frontends/daemon.js';
export { ControlClient } from './frontends/control-client.js';
export { parseDmsetupArgs } from './frontends/dmsetup/command.js';
export { executeDmsetup } from './frontends/dmsetup/execute.js';
export { BlockDevice } from './block/contract.js';
export type { BlockDeviceSupports, BlockExtent, WriteOptions } from './block/contract.js';
export { MemoryBlockDevice } from './block/memory-device.js';
export { FileBlockDevice } from './block/file-device.js';
export { FaultyBlockDevice } from './block/faulty-device.js';
export * from './block/units.js';
export { DmError, DM_ERROR_CODES } from './core/errors.js';
export type { DmErrorCode } from './core/errors.js';
export { SimulatedClock, createSystemClock } from './core/clock.js';
export type { Clock } from './core/clock.js';
export { createRng } from './core/rng.js';
export type { Rng } from './core/rng.js';
export { EventLog } from './log/event-log.js';
export type { DmEvent, DmEventType, LoggedEvent, BioOp } from './log/events.js';
export { compileMachine } from './core/compiled-machine.js';
export type { CompiledMachine } from './core/compiled-machine.js';
export { MACHINES } from '../machines/index.js';
export { machineModel, machineNames, isFlatModel, MACHINE_MODEL_FORMAT } from './inspect/machine-model.js';
export type { MachineModel, MachineStateModel, MachineTransitionModel, MachineRef } from './inspect/machine-model.js';
export {
  toJsonDoc, toMermaid, toDot, toScxml, exportMachine, machinePaths, shortestMachinePaths, formatMachinePaths, MACHINE_EXPORT_FORMATS,
} from './inspect/machine-export.js';
export type { MachineExportFormat, MachinePath, MachinePaths, MachinePathsOptions } from './inspect/machine-export.js';
export { machineCoverage, coveringPaths, traceOnXstate, traceOnCompiled, formatCoverageTable, formatCoverageDetail } from './inspect/machine-coverage.js';
export type { CoverageReport, PathTrace } from './inspect/machine-coverage.js';
export type { TargetType, TargetContext } from './core/target-contract.js';
export { TargetRegistry, createDefaultTargetRegistry } from './core/target-registry.js';
export { DMSTATE_VERSION } from './version.js';
