"""Chinese sentence templates for the synthetic corpus (fields as in templates_en)."""

from __future__ import annotations

PII_TEMPLATES: tuple[str, ...] = (
    # 聊天
    "您好，我是{PERSON}，手机号{PHONE}，有问题请联系我。",
    "在吗？我换号了，新号码{PHONE}。{PERSON}",
    "我的邮箱是{EMAIL}，手机{PHONE}，麻烦尽快回复。",
    "我叫{PERSON}，家住{ADDRESS}，身份证号{NATIONAL_ID}。",
    "老师您好，我是{PERSON}的家长，电话{PHONE}。",
    "我的银行卡号是{CREDIT_CARD}，退款{amount}请打到这张卡。",
    "亲，订单{order}的收货地址改成{ADDRESS}，谢谢！",
    # 表单
    "姓名：{PERSON}；身份证号：{NATIONAL_ID}；出生日期：{DATE_OF_BIRTH}",
    "联系人：{PERSON}，邮箱：{EMAIL}，电话：{PHONE}",
    "报名表：姓名{PERSON}，出生{DATE_OF_BIRTH}，手机{PHONE}。",
    "简历：{PERSON}，{DATE_OF_BIRTH}，{PHONE}，{EMAIL}",
    "入职登记：{PERSON}，{DATE_OF_BIRTH}出生，身份证{NATIONAL_ID}，住址{ADDRESS}。",
    "实名认证失败：{PERSON}，证件号{NATIONAL_ID}，请重新上传。",
    "请核对身份信息：{PERSON}，身份证号码{NATIONAL_ID}。",
    # 邮件
    "请把发票发到我的邮箱{EMAIL}，订单号是{order}。",
    "发件人：{PERSON} <{EMAIL}>\n主题：发票{invoice}\n附件是订单{order}的发票。",
    "请联系{PERSON}（{EMAIL}）确认订单{order}的发货时间。",
    "请将合同寄给{PERSON}，电话{PHONE}，地址{ADDRESS}。",
    # 客服与日志
    "客户{PERSON}反映{product}无法开机，回电{PHONE}，工单{ticket}。",
    "登录异常：账号{EMAIL}于{date} {time}从{IP_ADDRESS}登录。",
    "服务器告警：{IP_ADDRESS}在{time}连续登录失败，客户端版本{version}。",
    "用户{EMAIL}反馈：升级到{version}后无法同步，工单{ticket}。",
    "VPN登录记录：{PERSON}，IP {IP_ADDRESS}，设备序列号{serial}。",
    "管理后台于{date}被{IP_ADDRESS}访问，操作账号{EMAIL}。",
    "检测到新设备登录：IP地址{IP_ADDRESS}，时间{date} {time}。",
    "网关{IP_ADDRESS}已升级固件{build}，负责人{PERSON}。",
    "客服记录：{PERSON}于{date}来电，{product}订单{order}申请退款{amount}。",
    "退货：{PERSON}，{ADDRESS}，商品{sku}，售后单{ticket}。",
    # 人事与医疗
    "患者{PERSON}，出生日期{DATE_OF_BIRTH}，联系电话{PHONE}。",
    "{PERSON}的紧急联系人是{PERSON2}，电话{PHONE}。",
    "员工档案：{PERSON}，生日{DATE_OF_BIRTH}，工资账户IBAN {IBAN}。",
    "员工{PERSON}的工资卡已改为{CREDIT_CARD}，请财务核实。",
    "会议改到{time}，参会人{PERSON}、{PERSON2}，有事打{PHONE}。",
    # 快递与支付
    "收货人：{PERSON}，电话：{PHONE}，地址：{ADDRESS}。订单号{order}。",
    "快递已到{ADDRESS}，请{PERSON}本人签收，运单号{tracking}。",
    "快递{tracking}已签收，收件人{PERSON}，地址{ADDRESS}。",
    "外卖地址：{ADDRESS}，电话{PHONE}，备注：放门口。",
    "快递员请打{PHONE}，{PERSON}在{ADDRESS:street}等您。",
    "请汇款至IBAN {IBAN}，收款人{PERSON}，金额{amount}。",
    "跨境汇款：付款人{PERSON}，收款账户{IBAN}，发票号{invoice}。",
    "收款信息：IBAN {IBAN}，参考号{ref}，金额{amount}。",
    "信用卡{CREDIT_CARD}于{date}消费{amount}，如非本人操作请及时挂失。",
    "持卡人{PERSON}，卡号{CREDIT_CARD}，订单{order}已支付。",
    "账户{EMAIL}绑定的银行卡{CREDIT_CARD}已解绑。",
    "租客{PERSON}，房屋地址{ADDRESS}，月租{amount}。",
    "{company}通知：{PERSON}（{PHONE}）的订单{order}将于{time}配送。",
)

NO_PII_TEMPLATES: tuple[str, ...] = (
    "您的订单{order}已发货，运单号{tracking}。",
    "发票号码{invoice}，金额{amount}，开票日期{date}。",
    "请升级到{version}，{build}版本存在已知问题。",
    "工单{ticket}已关闭，{product}已更换新机。",
    "{product}（型号{sku}）库存{qty}件，售价{amount}。",
    "会议时间：{date} {time}，地点三楼会议室。",
    "设备序列号{serial}，固件{build}，最近检查{date}。",
    "参考号{ref}：已收到付款{amount}，谢谢。",
    "{company}确认订单{order}将于{date}送达。",
    "退货单已生成：商品{sku}，运单号{tracking}。",
    "版本{version}更新说明：修复工单{ticket}中的同步问题。",
    "亲，{product}今天{time}前下单当天发货哦！",
)
