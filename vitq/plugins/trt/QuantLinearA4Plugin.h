/*
 * TensorRT IPluginV3 wrapper for the vitq QuantLinearA4 op (semantics: vitq/plugins/specs.py).
 * Structure follows TensorRT's own IPluginV3 samples (samples/sampleNonZeroPlugin): one class implementing
 * IPluginV3 + IPluginV3OneCore + IPluginV3OneBuild + IPluginV3OneRuntime, and an IPluginCreatorV3One.
 *
 * Syntax-checked against TensorRT headers where they exist (tests/test_plugins_cxx.py); not yet built into a
 * library or run against TensorRT; see vitq/plugins/NOTES.md and docs/jetson.md.
 *
 * Plugin identity (what TensorRT's ONNX parser looks up): name "QuantLinearA4", version "1", namespace "vitq".
 * Fields: act_scale (kFLOAT32), act_bits (kINT32, must be 4), weight_bits (kINT32, 4 or 8).
 * Inputs: X float32 [..., K]; W_q int8 [N, K]; w_scale float32 [N]; bias float32 [N] (optional 4th input).
 * Output: Y float32 [..., N]. Build the network strongly typed (NetworkDefinitionCreationFlag::kSTRONGLY_TYPED),
 * as for any explicit Q/DQ network, so the int8 weight input needs no dynamic range.
 */
#ifndef VITQ_QUANT_LINEAR_A4_PLUGIN_H
#define VITQ_QUANT_LINEAR_A4_PLUGIN_H

#include "NvInfer.h"

#include <string>
#include <vector>

namespace vitq
{

constexpr char const* kQUANT_LINEAR_A4_NAME{"QuantLinearA4"};
constexpr char const* kQUANT_LINEAR_A4_VERSION{"1"};
constexpr char const* kVITQ_NAMESPACE{"vitq"};

class QuantLinearA4Plugin : public nvinfer1::IPluginV3,
                            public nvinfer1::IPluginV3OneCore,
                            public nvinfer1::IPluginV3OneBuild,
                            public nvinfer1::IPluginV3OneRuntime
{
public:
    QuantLinearA4Plugin(
        float actScale, int32_t actBits, int32_t weightBits, int32_t actDynamic = 0, int32_t actGroup = 0);
    QuantLinearA4Plugin(QuantLinearA4Plugin const& p) = default;
    ~QuantLinearA4Plugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    void initFieldsToSerialize();

    float mActScale{1.F};
    int32_t mActBits{4};
    int32_t mWeightBits{4};
    int32_t mActDynamic{0}; // 1: per-row scale / zero point computed at run time (workspace: 2 * M floats)
    int32_t mActGroup{0};   // > 0: one scale / zero point per this many features of a row (workspace: 2 * M * K / G floats)
    int32_t mNbInputs{3}; // 4 when the bias input is present
    std::vector<nvinfer1::PluginField> mDataToSerialize;
    nvinfer1::PluginFieldCollection mFCToSerialize{};
};

class QuantLinearA4PluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    QuantLinearA4PluginCreator();
    ~QuantLinearA4PluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mPluginAttributes;
    nvinfer1::PluginFieldCollection mFC{};
};

} // namespace vitq

#endif // VITQ_QUANT_LINEAR_A4_PLUGIN_H
