/*
 * TensorRT IPluginV3 wrapper for QuantLinearA4: a thin adapter over the C API in ../kernels/vitq_kernels.h.
 * Syntax-checked against TensorRT 10.7 headers (tests/test_plugins_cxx.py, where headers exist); never built into
 * a library or run (no TensorRT or GPU in the sessions that wrote it); see vitq/plugins/NOTES.md.
 */
#include "QuantLinearA4Plugin.h"

#include "vitq_kernels.h"

#include <cmath>
#include <cstring>
#include <exception>
#include <iostream>
#include <memory>

using namespace nvinfer1;

namespace vitq
{
namespace
{
void logError(char const* what) noexcept
{
    std::cerr << "[vitq QuantLinearA4] " << what << std::endl;
}

size_t alignTo256(size_t bytes)
{
    return (bytes + 255) / 256 * 256;
}

int64_t leadingVolume(Dims const& d)
{
    int64_t v = 1;
    for (int32_t i = 0; i + 1 < d.nbDims; ++i)
    {
        v *= d.d[i];
    }
    return v;
}
} // namespace

QuantLinearA4Plugin::QuantLinearA4Plugin(
    float actScale, int32_t actBits, int32_t weightBits, int32_t actDynamic, int32_t actGroup)
    : mActScale(actScale)
    , mActBits(actBits)
    , mWeightBits(weightBits)
    , mActDynamic(actDynamic)
    , mActGroup(actGroup)
{
    initFieldsToSerialize();
}

void QuantLinearA4Plugin::initFieldsToSerialize()
{
    mDataToSerialize.clear();
    mDataToSerialize.emplace_back(PluginField("act_scale", &mActScale, PluginFieldType::kFLOAT32, 1));
    mDataToSerialize.emplace_back(PluginField("act_bits", &mActBits, PluginFieldType::kINT32, 1));
    mDataToSerialize.emplace_back(PluginField("weight_bits", &mWeightBits, PluginFieldType::kINT32, 1));
    mDataToSerialize.emplace_back(PluginField("act_dynamic", &mActDynamic, PluginFieldType::kINT32, 1));
    mDataToSerialize.emplace_back(PluginField("act_group", &mActGroup, PluginFieldType::kINT32, 1));
    mFCToSerialize.nbFields = static_cast<int32_t>(mDataToSerialize.size());
    mFCToSerialize.fields = mDataToSerialize.data();
}

// ---- IPluginV3 ----
IPluginCapability* QuantLinearA4Plugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    if (type == PluginCapabilityType::kBUILD)
    {
        return static_cast<IPluginV3OneBuild*>(this);
    }
    if (type == PluginCapabilityType::kRUNTIME)
    {
        return static_cast<IPluginV3OneRuntime*>(this);
    }
    if (type == PluginCapabilityType::kCORE)
    {
        return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* QuantLinearA4Plugin::clone() noexcept
{
    try
    {
        auto p = std::make_unique<QuantLinearA4Plugin>(*this);
        p->initFieldsToSerialize(); // the copied fields point into *this; re-point them at the clone
        return p.release();
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

// ---- IPluginV3OneCore ----
char const* QuantLinearA4Plugin::getPluginName() const noexcept
{
    return kQUANT_LINEAR_A4_NAME;
}

char const* QuantLinearA4Plugin::getPluginVersion() const noexcept
{
    return kQUANT_LINEAR_A4_VERSION;
}

char const* QuantLinearA4Plugin::getPluginNamespace() const noexcept
{
    return kVITQ_NAMESPACE;
}

// ---- IPluginV3OneBuild ----
int32_t QuantLinearA4Plugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t QuantLinearA4Plugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if ((nbInputs != 3 && nbInputs != 4) || nbOutputs != 1)
    {
        return -1;
    }
    mNbInputs = nbInputs;
    // W_q must be [N, K] with the same K as X; K % 8 == 0 (the kernel's precondition) when K is known.
    Dims const& x = in[0].desc.dims;
    Dims const& w = in[1].desc.dims;
    if (w.nbDims != 2 || x.nbDims < 1)
    {
        return -1;
    }
    int64_t const k = x.d[x.nbDims - 1];
    if (k >= 0 && w.d[1] >= 0 && (k != w.d[1] || k % 8 != 0))
    {
        return -1;
    }
    return 0;
}

bool QuantLinearA4Plugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut[pos].desc.format != PluginFormat::kLINEAR)
    {
        return false;
    }
    DataType const t = inOut[pos].desc.type;
    if (pos == 1)
    {
        return t == DataType::kINT8; // W_q
    }
    return t == DataType::kFLOAT; // X, w_scale, bias, Y
}

int32_t QuantLinearA4Plugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    outputTypes[0] = DataType::kFLOAT;
    return 0;
}

int32_t QuantLinearA4Plugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
    int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs < 3 || inputs[1].nbDims != 2 || inputs[0].nbDims < 1)
    {
        return -1;
    }
    outputs[0] = inputs[0];                              // [..., K]
    outputs[0].d[inputs[0].nbDims - 1] = inputs[1].d[0]; // -> [..., N]
    return 0;
}

size_t QuantLinearA4Plugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept
{
    // [prepared weights, padded to 256 bytes] [quantized activations (+ dynamic mode: row scales, zero points)], sized
    // for the S8 path, which needs at least as much as the S4 path; the weight shape is static (an initializer), M is
    // the profile's max of X
    Dims const& w = inputs[1].max;
    int const n = static_cast<int>(w.d[0]);
    int const k = static_cast<int>(w.d[1]);
    int const m = static_cast<int>(leadingVolume(inputs[0].max));
    return alignTo256(vitq_prepared_weight_bytes(n, k, VITQ_PATH_S8_MMA))
        + vitq_act_workspace_bytes(m, k, VITQ_PATH_S8_MMA, mActDynamic, mActGroup);
}

// ---- IPluginV3OneRuntime ----
int32_t QuantLinearA4Plugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != 3 && nbInputs != 4)
    {
        return -1;
    }
    mNbInputs = nbInputs;
    return 0;
}

int32_t QuantLinearA4Plugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    Dims const& xd = inputDesc[0].dims;
    int64_t const m = leadingVolume(xd);
    int64_t const k = xd.d[xd.nbDims - 1];
    int64_t const n = inputDesc[1].dims.d[0];
    if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX || inputDesc[1].dims.d[1] != k)
    {
        return -1;
    }
    float const* x = static_cast<float const*>(inputs[0]);
    float const* wScale = static_cast<float const*>(inputs[2]);
    // the optional bias is the 4th input (mNbInputs is recorded in onShapeChange, which precedes enqueue)
    float const* bias = mNbInputs == 4 ? static_cast<float const*>(inputs[3]) : nullptr;
    // S4 tensor-core path on sm_80..sm_89 (Orin) for static int4 weights, S8 otherwise (vitq_kernels.h)
    int32_t const path = vitq_resolve_path(VITQ_PATH_AUTO, mWeightBits == 4 ? VITQ_W_INT4_PACKED : VITQ_W_INT8,
        mActDynamic);
    if (path < 0)
    {
        return path;
    }
    // Two kernels after the weights: quantize X once per row, then the pipelined GEMM. The weights are constant;
    // preparing them (pad, pack) on every call costs 2-7 us on an H100 at DeiT-T / Swin-T shapes.
    // TODO(perf): prepare once into a plugin-owned buffer.
    char* ws = static_cast<char*>(workspace);
    size_t const wqBytes = alignTo256(vitq_prepared_weight_bytes(static_cast<int>(n), static_cast<int>(k), path));
    int32_t rc = vitq_prepare_weights(inputs[1], VITQ_W_INT8, static_cast<int>(n), static_cast<int>(k), path, ws,
        stream);
    if (rc != VITQ_OK)
    {
        return -rc;
    }
    rc = vitq_quant_linear_a4_prepared(x, ws, wScale, bias, outputs[0], VITQ_OUT_F32, static_cast<int>(m),
        static_cast<int>(n), static_cast<int>(k), mActScale, mActDynamic, mActGroup, path, ws + wqBytes, stream);
    return rc == VITQ_OK ? 0 : -rc;
}

IPluginV3* QuantLinearA4Plugin::attachToContext(IPluginResourceContext* context) noexcept
{
    return clone();
}

PluginFieldCollection const* QuantLinearA4Plugin::getFieldsToSerialize() noexcept
{
    return &mFCToSerialize;
}

// ---- creator ----
QuantLinearA4PluginCreator::QuantLinearA4PluginCreator()
{
    mPluginAttributes.clear();
    mPluginAttributes.emplace_back(PluginField("act_scale", nullptr, PluginFieldType::kFLOAT32, 1));
    mPluginAttributes.emplace_back(PluginField("act_bits", nullptr, PluginFieldType::kINT32, 1));
    mPluginAttributes.emplace_back(PluginField("weight_bits", nullptr, PluginFieldType::kINT32, 1));
    mPluginAttributes.emplace_back(PluginField("act_dynamic", nullptr, PluginFieldType::kINT32, 1));
    mPluginAttributes.emplace_back(PluginField("act_group", nullptr, PluginFieldType::kINT32, 1));
    mFC.nbFields = static_cast<int32_t>(mPluginAttributes.size());
    mFC.fields = mPluginAttributes.data();
}

char const* QuantLinearA4PluginCreator::getPluginName() const noexcept
{
    return kQUANT_LINEAR_A4_NAME;
}

char const* QuantLinearA4PluginCreator::getPluginVersion() const noexcept
{
    return kQUANT_LINEAR_A4_VERSION;
}

char const* QuantLinearA4PluginCreator::getPluginNamespace() const noexcept
{
    return kVITQ_NAMESPACE;
}

PluginFieldCollection const* QuantLinearA4PluginCreator::getFieldNames() noexcept
{
    return &mFC;
}

IPluginV3* QuantLinearA4PluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    try
    {
        float actScale{-1.F};
        int32_t actBits{4};
        int32_t weightBits{4};
        int32_t actDynamic{0};
        int32_t actGroup{0};
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (std::strcmp(f.name, "act_scale") == 0 && f.type == PluginFieldType::kFLOAT32)
            {
                actScale = *static_cast<float const*>(f.data);
            }
            else if (std::strcmp(f.name, "act_scale") == 0 && f.type == PluginFieldType::kFLOAT64)
            {
                actScale = static_cast<float>(*static_cast<double const*>(f.data));
            }
            else if (std::strcmp(f.name, "act_bits") == 0 && f.type == PluginFieldType::kINT32)
            {
                actBits = *static_cast<int32_t const*>(f.data);
            }
            else if (std::strcmp(f.name, "weight_bits") == 0 && f.type == PluginFieldType::kINT32)
            {
                weightBits = *static_cast<int32_t const*>(f.data);
            }
            else if (std::strcmp(f.name, "act_dynamic") == 0 && f.type == PluginFieldType::kINT32)
            {
                actDynamic = *static_cast<int32_t const*>(f.data);
            }
            else if (std::strcmp(f.name, "act_group") == 0 && f.type == PluginFieldType::kINT32)
            {
                actGroup = *static_cast<int32_t const*>(f.data);
            }
            // other fields (e.g. plugin_namespace / plugin_version forwarded by a parser) are ignored
        }
        bool const scaleOk = actDynamic == 1 || (actScale > 0.F && std::isfinite(actScale));
        bool const groupOk = actGroup == 0
            || (actDynamic == 1 && (actGroup == 32 || actGroup == 64 || actGroup == 128 || actGroup == 256));
        if (!scaleOk || !groupOk || actBits != 4 || (weightBits != 4 && weightBits != 8)
            || (actDynamic != 0 && actDynamic != 1))
        {
            logError("invalid attributes: need act_bits == 4, weight_bits in {4, 8}, act_dynamic in {0, 1}, "
                     "act_scale > 0 when act_dynamic == 0, and act_group in {0, 32, 64, 128, 256} (non-zero only "
                     "with act_dynamic == 1)");
            return nullptr;
        }
        return new QuantLinearA4Plugin(actDynamic ? 0.F : actScale, actBits, weightBits, actDynamic, actGroup);
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

} // namespace vitq

// ---- registration ----
// Dynamic loading (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins, version-compatible engines): TensorRT
// calls getCreators(). Static registration (ctypes.CDLL / dlopen, trtexec --staticPlugins): a static initializer
// registers the creator. Only one of the two must be active, or the creator is registered twice; CMake option
// VITQ_STATIC_REGISTRATION picks (default ON).
extern "C" TENSORRTAPI IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static vitq::QuantLinearA4PluginCreator sCreator;
    static IPluginCreatorInterface* const sCreators[] = {&sCreator};
    nbCreators = 1;
    return sCreators;
}

extern "C" TENSORRTAPI void setLoggerFinder(ILoggerFinder* finder) {}

#if VITQ_STATIC_REGISTRATION
namespace
{
struct StaticRegistrar
{
    StaticRegistrar()
    {
        int32_t n = 0;
        IPluginCreatorInterface* const* creators = getCreators(n);
        for (int32_t i = 0; i < n; ++i)
        {
            getPluginRegistry()->registerCreator(*creators[i], vitq::kVITQ_NAMESPACE);
        }
    }
};
StaticRegistrar const sRegistrar{};
} // namespace
#endif
